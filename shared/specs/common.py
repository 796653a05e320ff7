"""What every job kind shares: kinds, statuses, seeds, prompts, artifacts, LoRA references,
the LoRA name rule (a training names its LoRA by it, as an upload does), the safety policy
a worker applies to its outputs and the webhook a job may carry.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
)
from pydantic_core import PydanticCustomError

from shared.text import MULTILINE, RequestModel

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1


class JobKind(StrEnum):
    GENERATION = "generation"
    SWEEP = "sweep"
    TRAINING = "training"
    TAGGING = "tagging"
    SCENE = "scene"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


Prompt = Annotated[
    str,
    Field(min_length=1, max_length=MAX_PROMPT_CHARS, examples=["a red fox in snow, golden hour"]),
    AfterValidator(_not_blank),
    MULTILINE,
]
Size = Annotated[int, Field(ge=64, le=4096, multiple_of=8, description="Pixels, multiple of 8.")]


class LoraRef(BaseModel):
    """A LoRA as the worker needs it: where its file is and what to check it against."""

    id: str
    name: str
    key: str
    sha256: str
    weight: float
    subject_id: str | None = None  # the subject it was trained from: named in manifests


# A LoRA's name is written into prompts (`<lora:name:0.8>`), PNG text and manifests, and is the
# obvious file name when someone downloads it: it must be safe in all of them.
LORA_NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"
LORA_NAME_RULE = ("1 to 64 characters, each an ASCII letter, a digit, '.', '_' or '-', "
                  "not starting with '.'")


def lora_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a LoRA (see ``LORA_NAME_RULE``), or None when it can."""
    if re.fullmatch(LORA_NAME_PATTERN, name):
        return None
    return f"a LoRA name is {LORA_NAME_RULE}"


def _check_lora_name(name: str) -> str:
    problem = lora_name_problem(name)
    if problem is not None:
        raise PydanticCustomError("lora_name", problem)
    return name


LoraName = Annotated[str, AfterValidator(_check_lora_name), Field(
    min_length=1, max_length=64, json_schema_extra={"pattern": LORA_NAME_PATTERN},
    description=f"The LoRA's name: {LORA_NAME_RULE}.",
)]


class SafetyPolicy(BaseModel):
    action: Literal["blur", "withhold"]
    threshold: float = Field(ge=0, le=1)


class ArtifactRef(BaseModel):
    """An object a job wrote, as the worker reports it in its ``succeeded`` event."""

    key: str = Field(description="Storage key of the object, under the job's prefix.")
    kind: Literal["image", "manifest", "contact_sheet", "metadata", "results", "lora", "sample",
                  "checkpoint", "metrics", "loss_curve", "pose_control", "body_mask", "face_mask",
                  "stage_image"] = Field(description="What the object is.")
    index: int | None = Field(default=None, description="Images: position in the job's output; null for "
                              "other kinds.")
    content_type: str = Field(description="MIME type of the object.")
    size: int = Field(description="Size in bytes.")
    sha256: str = Field(description="SHA-256 of the bytes, hex.")
    width: int | None = Field(default=None, description="Images: width in pixels.")
    height: int | None = Field(default=None, description="Images: height in pixels.")
    seed: int | None = Field(default=None, description="Images: the seed this image was generated with.")


# The job events a webhook can follow (``queued`` is not one: the submission's 202 says it).
WebhookEventType = Literal["running", "progress", "sample", "succeeded", "failed", "canceled"]
WEBHOOK_EVENT_TYPES: tuple[WebhookEventType, ...] = (
    "running", "progress", "sample", "succeeded", "failed", "canceled")
TERMINAL_EVENT_TYPES: tuple[WebhookEventType, ...] = ("succeeded", "failed", "canceled")
MAX_WEBHOOK_URL_CHARS = 2048


class WebhookTarget(RequestModel):
    """Where one job's events are posted (signed with the tenant's job secret); the gateway
    checks the URL against private networks before the job exists."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"url": "https://example.com/loomis-hook", "events": ["succeeded", "failed"]}]})

    url: str = Field(min_length=1, max_length=MAX_WEBHOOK_URL_CHARS,
                     description="An https URL (http only where the server allows it) that is "
                     "not on a private network.")
    events: list[WebhookEventType] = Field(
        default_factory=lambda: list(TERMINAL_EVENT_TYPES), min_length=1,
        max_length=len(WEBHOOK_EVENT_TYPES), description="The job events to post: "
        + ", ".join(WEBHOOK_EVENT_TYPES) + ". Default: the terminal ones.")


# The field every job spec carries (``webhook: JobWebhook = None``). ``exclude``: it never
# leaves the gateway in a dump, so the worker's task, the manifest and the job's recorded spec
# stay what they were; the gateway keeps it on the job row and counts it in the request hash
# itself.
JobWebhook = Annotated[WebhookTarget | None, Field(
    exclude=True, description="Post this job's events to a URL: "
    "`{url, events}`, signed with your job secret (`GET /v1/webhooks/job-secret`).")]

"""What every job kind shares: kinds, statuses, seeds, prompts, artifacts, LoRA references
and the safety policy a worker applies to its outputs.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
)

from shared.text import MULTILINE

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1


class JobKind(StrEnum):
    GENERATION = "generation"
    SWEEP = "sweep"
    TRAINING = "training"
    TAGGING = "tagging"


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


class SafetyPolicy(BaseModel):
    action: Literal["blur", "withhold"]
    threshold: float = Field(ge=0, le=1)


class ArtifactRef(BaseModel):
    """An object a job wrote, as the worker reports it in its ``succeeded`` event."""

    key: str = Field(description="Storage key of the object, under the job's prefix.")
    kind: Literal["image", "manifest", "contact_sheet", "metadata", "results", "lora", "sample",
                  "checkpoint", "metrics", "loss_curve"] = Field(description="What the object is.")
    index: int | None = Field(default=None, description="Images: position in the job's output; null for "
                              "other kinds.")
    content_type: str = Field(description="MIME type of the object.")
    size: int = Field(description="Size in bytes.")
    sha256: str = Field(description="SHA-256 of the bytes, hex.")
    width: int | None = Field(default=None, description="Images: width in pixels.")
    height: int | None = Field(default=None, description="Images: height in pixels.")
    seed: int | None = Field(default=None, description="Images: the seed this image was generated with.")

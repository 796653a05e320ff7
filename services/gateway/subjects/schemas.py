"""The subjects API's shapes: the multipart fields of a new subject, and a subject as read."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Json, field_validator

from shared.text import RequestModel

SubjectStatus = Literal["preparing", "captioning", "training", "ready", "failed", "canceled",
                        "deleting"]
ACTIVE_STATUSES = ("preparing", "captioning", "training")
FINISHED_STATUSES = ("ready", "failed", "canceled")
MIN_PHOTOS, MAX_PHOTOS = 3, 50
# below this a photo cannot show a face; below the training resolution it is only reported
MIN_PHOTO_SIDE = 64


SubjectWebhookEvent = Literal["preparing", "captioning", "training", "ready", "failed",
                             "canceled", "photos_deleted", "succeeded", "*"]


def _every_event() -> list[SubjectWebhookEvent]:
    return ["*"]


class SubjectWebhook(RequestModel):
    """Where the subject's stage changes are posted (signed as job webhooks are)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048, description="An https URL.")
    events: list[SubjectWebhookEvent] = Field(
        default_factory=_every_event, max_length=10, description="Which stage changes to "
        "send (`succeeded` is `ready`). Default: all of them.")


class SubjectFields(RequestModel):
    """The text fields of ``POST /v1/subjects``; the photos travel beside them (``photos``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="What you call the subject.")
    class_word: str = Field(min_length=2, max_length=40, pattern=r"^[A-Za-z][A-Za-z -]*[A-Za-z]$",
                            description="What the subject is: `person`, `man`, `woman`, `boy`, "
                            "`girl`, `dog`… (letters, spaces and hyphens).")
    token: str | None = Field(default=None, min_length=2, max_length=30,
                              pattern=r"^[A-Za-z][A-Za-z0-9_]+$", description="The trigger word "
                              "(letters, digits, `_`; kept lowercase). Default: a new rare made-up word.")
    preset: Literal["quick", "standard"] = Field(
        default="standard", description="`standard`: the classic recipe (each photo repeated "
        "300 times, one epoch: 5 photos train 1,500 steps, SD1.5 at 512 px); `quick`: a few "
        "steps at 64 px on tiny-sd15, for tests and CPUs.")
    overrides: Json[dict[str, Any]] | None = Field(
        default=None, description="Any training option over the preset, as JSON in a "
        "training request's shape, e.g. `{\"optim\": {\"max_train_steps\": 800}}`.")
    caption: bool = Field(default=False, description="Caption and tag the photos with the "
                          "tagger before training (the trigger first in each caption).")
    retain_photos: bool = Field(default=False, description="Keep the photos and everything "
                                "derived from them once the LoRA is made. Default: delete them.")
    consent: str = Field(min_length=1, max_length=2000, description="Who gave consent and for "
                         "what purpose; stored with the subject.")
    webhook: Json[SubjectWebhook] | None = Field(
        default=None, description="A URL, or JSON `{\"url\": …, \"events\": […]}`: notified "
        "at each stage change and at the end.")

    @field_validator("token")
    @classmethod
    def _lowercase(cls, value: str | None) -> str | None:
        # CLIP lowercases prompts: `Zeta` and `zeta` are one trigger
        return value.lower() if value is not None else None

    @field_validator("consent")
    @classmethod
    def _a_statement(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must say who consented and for what purpose")
        return value.strip()

    @field_validator("webhook", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.lstrip().startswith("{"):
            return json.dumps({"url": value.strip()})
        return value


class SubjectStage(BaseModel):
    """The stage now under way: its job and how far it is."""

    name: str = Field(description="preparing, captioning or training.")
    job_id: str | None = Field(description="The stage's job (`GET /v1/jobs/{id}`); null "
                               "until it is submitted.")
    progress: float = Field(description="The job's progress, 0-1.")


class SmallPhoto(BaseModel):
    photo: int = Field(description="Its index among the photos sent (0-based).")
    width: int = Field(description="Pixels, as the photo is seen (EXIF orientation applied).")
    height: int = Field(description="Pixels.")


class SubjectOut(BaseModel):
    id: str = Field(description="The subject's id: use it as `subject` in generations and "
                    "scenes.")
    name: str = Field(description="What you call the subject.")
    status: SubjectStatus = Field(description="preparing -> captioning -> training -> ready | "
                                  "failed | canceled; deleting while a DELETE finishes.")
    class_word: str = Field(description="What the subject is (person, man, woman…).")
    token: str = Field(description="The trigger word.")
    trigger_words: list[str] = Field(description="Put these in a prompt (generations and scenes "
                                     "naming the subject get them added).")
    preset: str = Field(description="quick or standard.")
    training: dict[str, Any] = Field(description="The training options the preset and "
                                     "overrides made.")
    caption: bool = Field(description="Whether the photos are captioned before training.")
    retain_photos: bool = Field(description="Whether the photos are kept once it is finished.")
    consent: str = Field(description="The consent statement given at creation.")
    photos: int = Field(description="Distinct photos accepted.")
    duplicates: list[dict[str, Any]] = Field(description="Photos dropped as copies of another.")
    small_photos: list[SmallPhoto] = Field(default_factory=list, description="Photos smaller "
                                           "than the training resolution: kept, but upscaled "
                                           "they teach less; send larger ones for a better LoRA.")
    stage: SubjectStage | None = Field(description="The stage under way; null when finished.")
    progress: float = Field(description="Progress of the current stage, 0-1.")
    dataset_id: str | None = Field(description="The dataset its photos were stored as.")
    tagging_job_id: str | None = Field(description="The captioning job (caption=true).")
    training_job_id: str | None = Field(description="The training job.")
    lora_id: str | None = Field(description="Its LoRA, once ready.")
    error: dict[str, Any] | None = Field(description="Why it failed: `code` and `message`.")
    purged: dict[str, Any] | None = Field(description="What retention deleted and when (the "
                                          "photos and everything derived from them).")
    lineage: dict[str, Any] = Field(description="What was derived from the subject: dataset, "
                                    "jobs, LoRA versions, outputs made with it.")
    created_at: datetime = Field(description="When it was created.")
    finished_at: datetime | None = Field(description="When it became ready, failed or canceled.")
    links: dict[str, str] = Field(description="Its own URL, its events and cancel.")


class SubjectPage(BaseModel):
    items: list[SubjectOut] = Field(description="Newest first.")
    next_cursor: str | None = Field(default=None, description="Pass as `cursor` for the next "
                                    "page; null on the last.")


class SubjectStreamEvent(BaseModel):
    """One message of ``GET /v1/subjects/{id}/events``."""

    subject_id: str = Field(description="The subject.")
    seq: int | None = Field(description="Stage events' order (the SSE id); null on progress.")
    type: str = Field(description="A status (preparing, captioning, training, ready, failed, "
                      "canceled), `photos_deleted`, or `progress`.")
    stage: str = Field(description="The stage the event belongs to.")
    at: datetime = Field(description="When it happened.")
    data: dict[str, Any] = Field(description="Details: the job, the LoRA, what was deleted.")

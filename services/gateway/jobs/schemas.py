"""What the jobs API returns."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, WithJsonSchema

from shared.outcomes import (
    GenerationOutcome,
    SceneOutcome,
    SweepOutcome,
    TaggingOutcome,
    TrainingOutcome,
)
from shared.specs import ArtifactRef, JobKind, JobStatus

# Each kind's outcome model: what its jobs report as their ``result``.
OUTCOMES: dict[JobKind, type[BaseModel]] = {
    JobKind.GENERATION: GenerationOutcome, JobKind.SWEEP: SweepOutcome,
    JobKind.TAGGING: TaggingOutcome, JobKind.TRAINING: TrainingOutcome,
    JobKind.SCENE: SceneOutcome,
}

# A job's result is what its worker reported, stored as sent; documented as its kind's model
# (the components are added by :func:`document_results`).
JobResult = Annotated[dict[str, Any], WithJsonSchema({"anyOf": [
    {"$ref": f"#/components/schemas/{model.__name__}"} for model in OUTCOMES.values()]})]


def document_results(spec: dict[str, Any]) -> dict[str, Any]:
    """Put each kind's result model (and the models it nests) into the OpenAPI components."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in OUTCOMES.values():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return spec


class JobError(BaseModel):
    code: str = Field(examples=["model_unavailable"], description="Stable machine-readable reason, e.g. "
                      "`model_unavailable`, `timeout`, `worker_lost`.")
    message: str = Field(description="What went wrong, for people; never a traceback.")


class ArtifactOut(BaseModel):
    kind: str = Field(examples=["image"], description="image, manifest, contact_sheet, metadata, results, "
                      "lora, sample, checkpoint, metrics (a training's per-step JSON) or loss_curve "
                      "(its PNG).")
    index: int | None = Field(default=None, description="Images: position in the job's output (sweeps: row "
                              "x columns + column); null for other kinds.")
    url: str = Field(description="Presigned download URL, valid for a limited time.")
    content_type: str = Field(description="MIME type of the object.")
    size: int = Field(description="Size in bytes.")
    sha256: str = Field(description="SHA-256 of the bytes, hex.")
    width: int | None = Field(default=None, description="Images: width in pixels.")
    height: int | None = Field(default=None, description="Images: height in pixels.")
    seed: int | None = Field(default=None, description="Images: the seed this image was generated with.")


class JobOut(BaseModel):
    id: str = Field(description="The job's id (UUID).")
    kind: JobKind = Field(description="generation, sweep, tagging or training.")
    status: JobStatus = Field(description="queued, running, succeeded, failed or canceled; the last three "
                              "never change.")
    progress: float = Field(description="0..1")
    cancel_requested: bool = Field(description="A cancel was asked for; a running job stops at its next "
                                   "step.")
    spec: dict[str, Any] = Field(description="The resolved spec: every server-chosen field filled.")
    error: JobError | None = Field(default=None, description="Why the job failed: a stable code and a "
                                   "message. Null unless failed.")
    artifacts: list[ArtifactOut] = Field(default_factory=list, description="What the job wrote, each with "
                                         "a presigned download URL.")
    result: JobResult = Field(default_factory=dict, description="What the job reported when it "
                              "succeeded, by kind: GenerationOutcome, SweepOutcome, TaggingOutcome "
                              "or TrainingOutcome (empty until then).")
    attempts: int = Field(description="Runs so far: more than 1 when a worker died and the job was "
                          "delivered again.")
    created_at: datetime = Field(description="When the job was submitted (RFC 3339, UTC).")
    started_at: datetime | None = Field(default=None, description="When a worker last started it (RFC "
                                        "3339, UTC).")
    finished_at: datetime | None = Field(default=None, description="When it reached a terminal status (RFC "
                                         "3339, UTC).")
    links: dict[str, str] = Field(description="Related URLs: `self`, `events` (SSE) and `cancel`.")


class JobPage(BaseModel):
    items: list[JobOut] = Field(description="Jobs, newest first.")
    next_cursor: str | None = Field(description="Pass as ?cursor= to get the next page.")


# Server-Sent Events of GET /v1/jobs/{id}/events. Each SSE message has `event:` the type,
# `id:` the job's seq and `data:` one of the JSON objects below. These models document the
# stream in OpenAPI; the worker writes the events as plain dicts through shared.events.


class QueuedData(BaseModel):
    queue: str = Field(description="The queue the job waits on, e.g. `loomis:queue:generator`.")


class RunningData(BaseModel):
    attempt: int = Field(description="1 on the first run; higher when a worker died and the "
                         "job was delivered again.")
    worker: str = Field(description="The name of the worker process running it.")


class ProgressData(BaseModel):
    """Every kind reports `step`/`total_steps`/`progress`; the other fields are kind-specific."""

    step: int | None = Field(default=None, description="Steps done (denoising steps, tagger "
                             "batches or training steps).")
    total_steps: int | None = Field(default=None, description="Steps in all.")
    progress: float | None = Field(default=None, description="Fraction of the whole job done, "
                                   "0..1 (sweeps: across every cell).")
    cell: int | None = Field(default=None, description="Sweeps: the cell being rendered (0-based).")
    cells: int | None = Field(default=None, description="Sweeps: how many cells in all.")
    stage: str | None = Field(default=None, description="Taggings: `caption` or `tags`.")
    epoch: int | None = Field(default=None, description="Trainings: the current epoch.")
    loss: float | None = Field(default=None, description="Trainings: running average loss.")
    lr: float | None = Field(default=None, description="Trainings: the current learning rate.")
    step_loss: float | None = Field(default=None, description="Trainings: this step's loss "
                                    "alone.")
    step_time_s: float | None = Field(default=None, description="Trainings: seconds since the "
                                      "previous step ended.")
    it_per_s: float | None = Field(default=None, description="Trainings: steps per second.")
    eta_s: float | None = Field(default=None, description="Trainings: seconds left, estimated.")
    resumed_from: str | None = Field(default=None, description="Trainings: the saved state "
                                     "(storage key) the run continues from.")


class SampleData(BaseModel):
    step: int = Field(description="The training step the sample image was made at.")
    index: int = Field(description="Which of that step's sample prompts it is (0-based).")
    key: str = Field(description="Its storage key, `training/{tenant}/{job}/samples/…`.")


class SucceededData(BaseModel):
    artifacts: list[ArtifactRef] = Field(default_factory=list, description="Every object the "
                                         "job wrote (storage keys; `GET /v1/jobs/{id}` gives "
                                         "download URLs).")
    result: JobResult = Field(default_factory=dict, description="What the job reports: "
                              "timings, the model and its hash, seeds, safety verdicts; "
                              "trainings: the registered LoRA; the same as the job's `result`.")
    spec_filled: dict[str, Any] | None = Field(default=None, description="Spec fields only the "
                                               "worker could choose (e.g. the model's default "
                                               "scheduler).")


class FailedData(BaseModel):
    error: JobError = Field(description="A stable `code` and a message; never a traceback.")


class CanceledData(BaseModel):
    reason: str = Field(description="Who canceled it and when.")


class _EventBase(BaseModel):
    job_id: str = Field(description="The job this event belongs to.")
    seq: int = Field(description="The job's event counter, also the SSE `id`: send it back as "
                     "`Last-Event-ID` to resume after it.")
    at: datetime = Field(description="When the event happened (RFC 3339).")
    status: JobStatus = Field(description="The job's status after this event.")


class QueuedEvent(_EventBase):
    """The job was accepted and waits for a worker."""

    type: Literal["queued"] = Field(description="SSE `event:` name.")
    data: QueuedData = Field(description="Where it waits.")


class RunningEvent(_EventBase):
    """A worker took the job (again after a worker died: `attempt` > 1)."""

    type: Literal["running"] = Field(description="SSE `event:` name.")
    data: RunningData = Field(description="Which run and worker.")


class ProgressEvent(_EventBase):
    """Sent after each step (denoising step, tagger batch, training step)."""

    type: Literal["progress"] = Field(description="SSE `event:` name.")
    data: ProgressData = Field(description="How far the job is.")


class SampleEvent(_EventBase):
    """Trainings: a sample image was rendered from the LoRA being trained."""

    type: Literal["sample"] = Field(description="SSE `event:` name.")
    data: SampleData = Field(description="Where the sample image is.")


class SucceededEvent(_EventBase):
    """Terminal: the job finished; the stream ends after it."""

    type: Literal["succeeded"] = Field(description="SSE `event:` name.")
    data: SucceededData = Field(description="The job's outcome.")


class FailedEvent(_EventBase):
    """Terminal: the job failed; the stream ends after it."""

    type: Literal["failed"] = Field(description="SSE `event:` name.")
    data: FailedData = Field(description="Why it failed.")


class CanceledEvent(_EventBase):
    """Terminal: the job was canceled; the stream ends after it."""

    type: Literal["canceled"] = Field(description="SSE `event:` name.")
    data: CanceledData = Field(description="Why it ended.")


JobStreamEvent = Annotated[
    QueuedEvent | RunningEvent | ProgressEvent | SampleEvent | SucceededEvent | FailedEvent
    | CanceledEvent,
    Field(discriminator="type"),
]

"""What a job of each kind reports when it succeeds, and the ``succeeded`` event that carries it.

Workers build these models and the gateway reads them back, so the contract between the two is
one class per kind instead of dictionaries both sides had to agree on by hand:

* ``GenerationOutcome``, ``SweepOutcome``, ``TaggingOutcome``, ``SceneOutcome`` and
  ``TrainingOutcome`` (with the LoRA it registered) are what the job reports: stored as the
  job's ``result`` and its ``result`` schema in OpenAPI, per kind.
* ``*Succeeded`` is the whole ``succeeded`` event's data: the artifacts, the outcome as
  ``result``, and what only the gateway's domain needs (the LoRA's registration record, a
  tagging job's per-item results). The gateway hands it to the job's own domain (a training
  registers its LoRA, a tagging writes its items).

Every field of an outcome is optional and unknown fields are kept (``extra="allow"``): an
outcome is a report, older workers and tests send less, and a newer worker may say more without
the gateway refusing the job's end. :meth:`Succeeded.event_data` dumps only what the worker
set, so the stored result is what the worker said, with no invented nulls.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.specs import ArtifactRef


class _Report(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelUsed(_Report):
    name: str | None = Field(default=None, description="The preset the job ran on.")
    sha256: str | None = Field(default=None, description="Hash of its weights, as loaded.")


class GenerationOutcome(_Report):
    """What a generation reports (its job's ``result``)."""

    timings: dict[str, float] | None = Field(default=None, description="Seconds per phase: queue "
                                             "wait, load, inference, encode, store, total.")
    seeds: list[int] | None = Field(default=None, description="The seed of each image.")
    scheduler: str | None = Field(default=None, description="The scheduler that ran.")
    model: ModelUsed | None = Field(default=None, description="The model and its weights' hash.")
    device: str | None = Field(default=None, description="cuda, mps or cpu.")
    dtype: str | None = Field(default=None, description="Compute precision.")
    dtype_note: str | None = Field(default=None, description="Why the precision differs from "
                                   "the one asked for, when it does.")
    pipeline: str | None = Field(default=None, description="The diffusers pipeline class.")
    loras: list[dict[str, Any]] | None = Field(default=None, description="LoRAs applied, with "
                                               "their weights.")
    prompt_encoding: str | None = Field(default=None, description="How the prompt was "
                                        "encoded (plain, weighted, chunked).")
    batch_jobs: int | None = Field(default=None, description="Jobs rendered in the same batch.")
    nsfw_content_detected: list[bool] | None = Field(default=None, description="diffusers' own "
                                                     "checker, when a pipeline ran it.")
    safety: list[dict[str, Any]] | None = Field(default=None, description="Safety verdict per "
                                                "image.")
    withheld: list[int] | None = Field(default=None, description="Indexes of withheld images.")


class SweepOutcome(_Report):
    """A sweep's report."""

    timings: dict[str, float] | None = Field(default=None, description="Seconds per phase.")
    cells: int | None = Field(default=None, description="Images rendered (one per cell).")
    columns: int | None = Field(default=None, description="Cells per row of the contact sheet.")
    rows: int | None = Field(default=None, description="Rows of the contact sheet.")
    model: ModelUsed | None = Field(default=None, description="The model and its weights' hash.")
    safety: list[dict[str, Any]] | None = Field(default=None, description="Safety verdict per "
                                                "cell.")


class FailedItem(_Report):
    item: str = Field(description="The dataset item's id.")
    error: str = Field(description="Why it failed.")


class TaggingOutcome(_Report):
    """A tagging job's report; the captions and tags themselves are on the dataset's items."""

    timings: dict[str, float] | None = Field(default=None, description="Seconds per phase.")
    images: int | None = Field(default=None, description="Images the job was given.")
    captioned: int | None = Field(default=None, description="Images that got a caption.")
    tagged: int | None = Field(default=None, description="Images that got tags.")
    failed: list[FailedItem] | None = Field(default=None, description="Images that failed, each "
                                            "with its error; the others keep their results.")


class TrainedLora(_Report):
    id: str = Field(description="The registered LoRA's id: use it in a generation's `loras`.")
    name: str = Field(description="Its name.")
    trigger_words: list[str] = Field(default_factory=list, description="Words its training "
                                     "captions carried.")


class TrainingOutcome(_Report):
    """What a training reports, with the LoRA it registered (`lora`)."""

    timings: dict[str, float] | None = Field(default=None, description="Seconds per phase.")
    steps: int | None = Field(default=None, description="Optimizer steps trained.")
    epochs: int | None = Field(default=None, description="Epochs trained.")
    final_loss: float | None = Field(default=None, description="kohya's running average loss "
                                     "at the last step.")
    lora: TrainedLora | None = Field(default=None, description="The LoRA it registered.")
    warnings: list[str] | None = Field(default=None, description="What the gateway found "
                                       "wrong with the captions (a trigger they lack).")


class ActionScore(_Report):
    id: str = Field(description="The action's id.")
    name: str = Field(description="Its name.")
    score: float = Field(description="Cosine similarity of its name and description to the text.")


class SceneOutcome(_Report):
    """What a scene reports: the prompt it ran, the action (and, from text, how each scored)."""

    timings: dict[str, float] | None = Field(default=None, description="Seconds per phase and "
                                             "stage (`body_s`, `face_s`).")
    seeds: list[int] | None = Field(default=None, description="The seed of each image.")
    prompt: str | None = Field(default=None, description="The final prompt of the body stage.")
    face_prompt: str | None = Field(default=None, description="The face stage's prompt (with the "
                                    "LoRA's trigger words), when it ran.")
    action: ActionScore | None = Field(default=None, description="The action used.")
    action_scores: list[ActionScore] | None = Field(default=None, description="From "
                                                    "`action_text`: every candidate, best first.")
    stages: list[str] | None = Field(default=None, description="The stages that ran: body, face.")
    model: ModelUsed | None = Field(default=None, description="The model and its weights' hash.")
    scheduler: str | None = Field(default=None, description="The scheduler that ran.")
    loras: list[dict[str, Any]] | None = Field(default=None, description="LoRAs applied.")
    safety: list[dict[str, Any]] | None = Field(default=None, description="Safety verdict per "
                                                "image.")


class ItemResult(_Report):
    """One dataset item's outcome in a tagging job."""

    caption: str | None = None
    tags: list[str] | None = None
    error: str | None = None


class LoraRegistration(BaseModel):
    """The LoRA a training made, for the gateway to register as the tenant's."""

    id: str
    name: str
    family: str
    base_model: str
    key: str
    sha256: str
    size: int
    rank: int
    info: dict[str, Any] = Field(default_factory=dict)


class Succeeded(BaseModel):
    """The data of a ``succeeded`` event."""

    artifacts: list[ArtifactRef] = Field(default_factory=list)
    spec_filled: dict[str, Any] | None = None

    def event_data(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_unset=True)
        # artifacts whole, nulls included: clients read `index`, `width` on every one
        data["artifacts"] = [artifact.model_dump(mode="json") for artifact in self.artifacts]
        return data


class GenerationSucceeded(Succeeded):
    result: GenerationOutcome = Field(default_factory=GenerationOutcome)


class SweepSucceeded(Succeeded):
    result: SweepOutcome = Field(default_factory=SweepOutcome)


class TaggingSucceeded(Succeeded):
    result: TaggingOutcome = Field(default_factory=TaggingOutcome)
    # per item id; the gateway writes them onto the dataset's items, not into the event log
    dataset_items: dict[str, ItemResult] = Field(default_factory=dict)


class SceneSucceeded(Succeeded):
    result: SceneOutcome = Field(default_factory=SceneOutcome)
    # action id -> {"hash", "vector"}: embeddings the job computed, for the gateway to cache
    action_embeddings: dict[str, dict[str, Any]] = Field(default_factory=dict)


class TrainingSucceeded(Succeeded):
    result: TrainingOutcome = Field(default_factory=TrainingOutcome)
    register_lora: LoraRegistration | None = None

"""Job specs: the API request body, the queued payload and the stored manifest are one model.

Structural rules (types, ranges, multiples of 8) live on the model so every layer checks
them the same way; rules that need the model registry live in :func:`resolve_generation`,
which the gateway runs before queueing and which fills the server-chosen fields.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from shared.errors import ValidationFailed
from shared.models import ModelRegistry, canonical_scheduler

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1


class JobKind(StrEnum):
    GENERATION = "generation"
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
]
Size = Annotated[int, Field(ge=64, le=4096, multiple_of=8, description="Pixels, multiple of 8.")]


class TextToImageSpec(BaseModel):
    """A text-to-image request. Fields left out are filled from the model's family defaults."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "a red fox in snow, golden hour", "model": "tiny-sd15", "steps": 4,
                 "seed": 42},
                {"prompt": "a lighthouse at dusk, oil painting", "negative_prompt": "blurry",
                 "model": "sd15", "width": 512, "height": 768, "steps": 30,
                 "guidance_scale": 7.0, "scheduler": "DPM++ 2M Karras", "num_images": 2},
            ]
        },
    )

    prompt: Prompt
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(
        default=None, max_length=100, description="Preset name; default from settings."
    )
    width: Size | None = None
    height: Size | None = None
    steps: int | None = Field(default=None, ge=1, le=500, description="Denoising steps.")
    guidance_scale: float | None = Field(default=None, ge=0, le=50)
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED,
        description="Image i uses seed + i. Drawn at random and recorded when absent.",
    )
    num_images: int = Field(default=1, ge=1, le=8)
    scheduler: str | None = Field(
        default=None, description="e.g. 'Euler a', 'DPM++ 2M Karras', 'DDIM'. Default: model's."
    )

    def is_resolved(self) -> bool:
        return None not in (self.model, self.width, self.height, self.steps, self.guidance_scale,
                            self.seed)


def resolve_generation(
    spec: TextToImageSpec, *, registry: ModelRegistry, default_model: str
) -> TextToImageSpec:
    """Check the spec against its model preset and fill every field the server chooses."""
    errors: list[dict[str, Any]] = []
    model_name = spec.model or default_model
    preset = registry.get(model_name)
    if preset is None:
        raise ValidationFailed([{
            "field": "model",
            "message": f"unknown model {model_name!r}; known: {', '.join(registry.names())}",
        }])
    limits = preset.limits
    width = spec.width or limits.default_size
    height = spec.height or limits.default_size
    for field, value in (("width", width), ("height", height)):
        if not limits.min_size <= value <= limits.max_size:
            errors.append({
                "field": field,
                "message": f"{model_name} supports {limits.min_size}-{limits.max_size} px",
            })
    steps = spec.steps or limits.default_steps
    if steps > limits.max_steps:
        errors.append({"field": "steps", "message": f"{model_name} allows at most "
                       f"{limits.max_steps} steps"})
    scheduler = spec.scheduler
    if scheduler is not None:
        canonical = canonical_scheduler(scheduler)
        if canonical is None or canonical not in limits.schedulers:
            errors.append({"field": "scheduler", "message": f"{scheduler!r} is not available "
                           f"for {preset.family}; choose one of: {', '.join(limits.schedulers)}"})
        scheduler = canonical
    if errors:
        raise ValidationFailed(errors)
    return spec.model_copy(update={
        "model": model_name,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance_scale": (spec.guidance_scale if spec.guidance_scale is not None
                           else limits.default_guidance),
        "seed": spec.seed if spec.seed is not None else secrets.randbelow(MAX_SEED + 1),
        "scheduler": scheduler,
    })


class GenerationTask(BaseModel):
    """What the gateway queues for the generator: a resolved spec and where it belongs."""

    job_id: str
    tenant_id: str
    spec: TextToImageSpec


class ArtifactRef(BaseModel):
    """An object a job wrote, as the worker reports it in its ``succeeded`` event."""

    key: str
    kind: Literal["image", "manifest"]
    index: int | None = None
    content_type: str
    size: int
    sha256: str
    width: int | None = None
    height: int | None = None
    seed: int | None = None


class GenerationManifest(BaseModel):
    """Everything needed to reproduce an output, stored beside it as ``manifest.json``."""

    job_id: str
    tenant_id: str
    spec: TextToImageSpec
    model: dict[str, Any]
    scheduler: str
    seeds: list[int]
    images: list[ArtifactRef]
    versions: dict[str, str]
    device: str
    timings: dict[str, float]
    created_at: datetime

"""The model registry: preset names clients use, mapped to a family, a source and options.

It is data only (no torch) so the gateway can validate a request against a preset's limits
before anything is queued. Workers resolve the same preset to weights on disk.
"""

from __future__ import annotations

import tomllib
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ModelFamily(StrEnum):
    SD15 = "sd15"
    SDXL = "sdxl"
    FLUX = "flux"


class FamilyDefaults(BaseModel):
    """What a family can do; the gateway refuses requests outside it."""

    default_size: int
    min_size: int = 64
    max_size: int
    default_steps: int
    max_steps: int = 150
    default_guidance: float
    schedulers: tuple[str, ...]


# Names as webui users write them -> (diffusers class, extra config).
SCHEDULERS: dict[str, tuple[str, dict[str, object]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "FlowMatch Euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
_UNET_SCHEDULERS = tuple(name for name in SCHEDULERS if name != "FlowMatch Euler")

FAMILIES: dict[ModelFamily, FamilyDefaults] = {
    ModelFamily.SD15: FamilyDefaults(
        default_size=512, max_size=1024, default_steps=25, default_guidance=7.5,
        schedulers=_UNET_SCHEDULERS,
    ),
    ModelFamily.SDXL: FamilyDefaults(
        default_size=1024, min_size=256, max_size=2048, default_steps=30, default_guidance=6.0,
        schedulers=_UNET_SCHEDULERS,
    ),
    ModelFamily.FLUX: FamilyDefaults(
        default_size=1024, min_size=256, max_size=2048, default_steps=28, default_guidance=3.5,
        schedulers=("FlowMatch Euler",),
    ),
}


def canonical_scheduler(name: str) -> str | None:
    """Clients type 'euler a' or 'DPM++ 2M karras'; match case- and space-insensitively."""
    wanted = " ".join(name.split()).casefold()
    return next((known for known in SCHEDULERS if known.casefold() == wanted), None)


class ModelPreset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    family: ModelFamily
    source: str = Field(
        description="'builtin:<name>' (built locally from configs), a hub id, or a directory."
    )
    revision: str | None = None
    dtype: str = Field(default="auto", description="auto, float32, float16, bfloat16")
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    # Overrides of the family defaults, for presets such as FLUX.1-schnell.
    default_size: int | None = None
    max_size: int | None = None
    default_steps: int | None = None
    max_steps: int | None = None
    default_guidance: float | None = None
    description: str = ""

    @property
    def limits(self) -> FamilyDefaults:
        """Family limits with this preset's overrides applied."""
        base = FAMILIES[self.family]
        updates = {
            key: value
            for key in ("default_size", "max_size", "default_steps", "max_steps", "default_guidance")
            if (value := getattr(self, key)) is not None
        }
        return base.model_copy(update=updates)


BUILTIN_PRESETS: tuple[ModelPreset, ...] = (
    ModelPreset(
        name="tiny-sd15", family=ModelFamily.SD15, source="builtin:tiny-sd15",
        default_size=64, default_steps=4, dtype="float32",
        description="A few-MB SD1.5-shaped model with random weights, built locally for tests, "
        "the offline demo and CPU benchmarks. Its images are noise.",
    ),
    ModelPreset(
        name="sd15", family=ModelFamily.SD15, source="stable-diffusion-v1-5/stable-diffusion-v1-5",
        dtype="float16", description="Stable Diffusion 1.5.",
    ),
    ModelPreset(
        name="sdxl", family=ModelFamily.SDXL, source="stabilityai/stable-diffusion-xl-base-1.0",
        dtype="float16", vae_tiling=True, description="SDXL base 1.0.",
    ),
    ModelPreset(
        name="flux-schnell", family=ModelFamily.FLUX, source="black-forest-labs/FLUX.1-schnell",
        dtype="bfloat16", default_steps=4, max_steps=8, default_guidance=0.0, cpu_offload=True,
        description="FLUX.1 [schnell]: 4 steps, no guidance.",
    ),
    ModelPreset(
        name="flux-dev", family=ModelFamily.FLUX, source="black-forest-labs/FLUX.1-dev",
        dtype="bfloat16", default_guidance=3.5, cpu_offload=True, description="FLUX.1 [dev].",
    ),
)


class ModelRegistry:
    """Built-in presets plus those of an optional TOML file (``[[models]]`` tables)."""

    def __init__(self, presets: list[ModelPreset] | tuple[ModelPreset, ...]) -> None:
        self._presets = {preset.name: preset for preset in presets}

    @classmethod
    def load(cls, models_file: Path | None = None) -> ModelRegistry:
        presets = {preset.name: preset for preset in BUILTIN_PRESETS}
        if models_file is not None:
            with models_file.open("rb") as fh:
                data = tomllib.load(fh)
            for entry in data.get("models", []):
                preset = ModelPreset.model_validate(entry)
                presets[preset.name] = preset
        return cls(list(presets.values()))

    def get(self, name: str) -> ModelPreset | None:
        return self._presets.get(name)

    def names(self) -> list[str]:
        return sorted(self._presets)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._presets.values())

"""The model registry: preset names clients use, mapped to a family, a source and options.

It is data only (no torch) so the gateway can validate a request against a preset's limits
before anything is queued. Workers resolve the same preset to weights on disk.
"""

from __future__ import annotations

import logging
import tomllib
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)


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
    size_multiple: int = 8  # the VAE's factor; Flux packs 2x2 latent patches, so 16


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
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),  # as SD ships it; PRK needs many steps
    # The rest of kohya's sample samplers (services/trainer/sampling.py maps them), built as
    # kohya builds them: DPM-Solver (not ++) multistep, the single-step solver, KDPM2.
    "DPM 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "DPM++ 2S": ("DPMSolverSinglestepScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
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
        schedulers=("FlowMatch Euler",), size_multiple=16,
    ),
}


def canonical_scheduler(name: str) -> str | None:
    """Clients type 'euler a' or 'DPM++ 2M karras'; match case- and space-insensitively."""
    wanted = " ".join(name.split()).casefold()
    return next((known for known in SCHEDULERS if known.casefold() == wanted), None)


class ControlType(StrEnum):
    CANNY = "canny"
    DEPTH = "depth"
    OPENPOSE = "openpose"
    SCRIBBLE = "scribble"


class ModelPreset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    family: ModelFamily
    source: str = Field(
        description="'builtin:<name>' (built locally from configs), a hub id, a diffusers "
        "directory, or a single-file .safetensors checkpoint (webui/ComfyUI/BFL key layout)."
    )
    config: str | None = Field(
        default=None,
        description="For a single-file source: a local diffusers folder whose component "
        "configs (and tokenizers, and any component the file lacks, such as Flux's text "
        "encoders) it is read with. Default: the family's configs shipped with Loomis.",
    )
    tokenizer: str | None = Field(
        default=None,
        description="For a single-file source: a folder with the tokenizers, either a "
        "diffusers model's (`tokenizer/`, `tokenizer_2/`) or one CLIP tokenizer folder "
        "(vocab.json + merges.txt). Default: the config folder's, else the CLIP vocabulary "
        "installed by `loomis models tokenizer`.",
    )
    revision: str | None = None
    dtype: str = Field(default="auto", description="auto, float32, float16, bfloat16")
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    inpaint_source: str | None = Field(
        default=None,
        description="A dedicated inpainting model of the same family (same source forms). "
        "Without one, inpainting runs through the base model (the standard fallback).",
    )
    controlnets: dict[ControlType, str] = Field(
        default_factory=dict, description="ControlNet weights per control type (same source forms)."
    )
    lora_dim: int | None = Field(
        default=None,
        description="Input width of the attention projections LoRAs attach to (SD: the "
        "cross-attention dim, Flux: the transformer width); uploads are checked against it.",
    )
    lora_widths: dict[str, tuple[int, ...]] = Field(
        default_factory=dict,
        description="Every input/output width of the layers a LoRA can adapt, per component "
        "(`unet` or `transformer`, `text_encoder`, `text_encoder_2`). A LoRA with a layer of "
        "another width cannot load into this model and is refused at upload and submission; "
        "components left out are not checked.",
    )
    # Overrides of the family defaults, for presets such as FLUX.1-schnell.
    min_size: int | None = None
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
            for key in ("min_size", "default_size", "max_size", "default_steps", "max_steps",
                        "default_guidance")
            if (value := getattr(self, key)) is not None
        }
        return base.model_copy(update=updates)


def _tiny_controlnets(base: str) -> dict[ControlType, str]:
    return {kind: f"builtin:{base}-controlnet-{kind.value}" for kind in ControlType}


# Layer widths of the built-in models (Linear and Conv2d in and out features), so the gateway
# can refuse a LoRA made for another model without loading either. tests/test_loras.py derives
# them from the models themselves (the tiny ones as built, the real ones from their configs).
_CLIP_L = (768, 3072)
_TINY_CLIP = (32, 37)
_FLUX_TRANSFORMER = (64, 256, 768, 3072, 4096, 6144, 9216, 12288, 15360, 18432,
                     21504)  # 21504: BFL-layout exports fuse q, k, v and the MLP in linear1
_TINY_FLUX_TRANSFORMER = (16, 32, 64, 96, 128, 160, 192, 224, 256)  # 224: the same fusion
_TINY_NOTE = ("with random weights, built locally for tests, the offline demo and CPU benchmarks. "
              "Its images are noise.")

BUILTIN_PRESETS: tuple[ModelPreset, ...] = (
    ModelPreset(
        name="tiny-sd15", family=ModelFamily.SD15, source="builtin:tiny-sd15",
        inpaint_source="builtin:tiny-sd15-inpaint", controlnets=_tiny_controlnets("tiny-sd15"),
        default_size=64, default_steps=4, dtype="float32", lora_dim=32,
        lora_widths={"unet": (4, 32, 64, 96, 128, 256, 512), "text_encoder": _TINY_CLIP},
        description=f"A few-MB SD1.5-shaped model {_TINY_NOTE}",
    ),
    ModelPreset(
        name="tiny-sdxl", family=ModelFamily.SDXL, source="builtin:tiny-sdxl",
        controlnets=_tiny_controlnets("tiny-sdxl"), min_size=64, default_size=64,
        default_steps=4, dtype="float32", lora_dim=64,
        lora_widths={"unet": (4, 32, 64, 80, 96, 128, 256, 512), "text_encoder": _TINY_CLIP,
                     "text_encoder_2": _TINY_CLIP},
        description=f"An SDXL-shaped model (two text encoders, micro-conditioning) {_TINY_NOTE} "
        "It has no inpainting companion, so inpainting takes the base-model fallback.",
    ),
    ModelPreset(
        name="tiny-flux", family=ModelFamily.FLUX, source="builtin:tiny-flux",
        controlnets=_tiny_controlnets("tiny-flux"), min_size=64, default_size=64,
        default_steps=4, max_steps=50, default_guidance=3.5, dtype="float32", lora_dim=32,
        lora_widths={"transformer": _TINY_FLUX_TRANSFORMER, "text_encoder": _TINY_CLIP},
        description=f"A Flux-shaped model (MMDiT, CLIP + T5) {_TINY_NOTE}",
    ),
    ModelPreset(
        name="sd15", family=ModelFamily.SD15, source="stable-diffusion-v1-5/stable-diffusion-v1-5",
        inpaint_source="stable-diffusion-v1-5/stable-diffusion-inpainting",
        controlnets={
            ControlType.CANNY: "lllyasviel/control_v11p_sd15_canny",
            ControlType.DEPTH: "lllyasviel/control_v11f1p_sd15_depth",
            ControlType.OPENPOSE: "lllyasviel/control_v11p_sd15_openpose",
            ControlType.SCRIBBLE: "lllyasviel/control_v11p_sd15_scribble",
        },
        dtype="float16", lora_dim=768, description="Stable Diffusion 1.5.",
        lora_widths={"unet": (4, 320, 640, 768, 960, 1280, 1920, 2560, 5120, 10240),
                     "text_encoder": _CLIP_L},
    ),
    ModelPreset(
        name="sdxl", family=ModelFamily.SDXL, source="stabilityai/stable-diffusion-xl-base-1.0",
        inpaint_source="diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
        controlnets={
            ControlType.CANNY: "diffusers/controlnet-canny-sdxl-1.0",
            ControlType.DEPTH: "diffusers/controlnet-depth-sdxl-1.0",
            ControlType.OPENPOSE: "thibaud/controlnet-openpose-sdxl-1.0",
            ControlType.SCRIBBLE: "xinsir/controlnet-scribble-sdxl-1.0",
        },
        dtype="float16", vae_slicing=True, vae_tiling=True, lora_dim=2048,
        lora_widths={"unet": (4, 320, 640, 960, 1280, 1920, 2048, 2560, 2816, 5120, 10240),
                     "text_encoder": _CLIP_L, "text_encoder_2": (1280, 5120)},
        description="SDXL base 1.0 at 1024x1024.",
    ),
    ModelPreset(
        name="flux-schnell", family=ModelFamily.FLUX, source="black-forest-labs/FLUX.1-schnell",
        dtype="bfloat16", default_steps=4, max_steps=8, default_guidance=0.0, cpu_offload=True,
        lora_dim=3072, description="FLUX.1 [schnell]: 4 steps, no guidance.",
        lora_widths={"transformer": _FLUX_TRANSFORMER, "text_encoder": _CLIP_L},
    ),
    ModelPreset(
        name="flux-dev", family=ModelFamily.FLUX, source="black-forest-labs/FLUX.1-dev",
        controlnets={
            ControlType.CANNY: "InstantX/FLUX.1-dev-Controlnet-Canny",
            ControlType.DEPTH: "Shakker-Labs/FLUX.1-dev-ControlNet-Depth",
        },
        dtype="bfloat16", default_guidance=3.5, cpu_offload=True, lora_dim=3072,
        lora_widths={"transformer": _FLUX_TRANSFORMER, "text_encoder": _CLIP_L},
        description="FLUX.1 [dev]: guidance 3.5.",
    ),
)


class PresetOrigin(StrEnum):
    BUILTIN = "builtin"
    MODELS_FILE = "models_file"
    MODELS_DIR = "models_dir"


def scanned_preset(name: str, family: ModelFamily, path: Path) -> ModelPreset:
    """A preset for a model found in the models folder: the family's limits, and the layer
    widths of the family's reference model, which fine-tunes and merges keep."""
    reference = next(preset for preset in BUILTIN_PRESETS
                     if preset.family == family and not preset.source.startswith("builtin:"))
    return ModelPreset(
        name=name, family=family, source=str(path), dtype=reference.dtype,
        vae_slicing=reference.vae_slicing, vae_tiling=reference.vae_tiling,
        lora_dim=reference.lora_dim, lora_widths=reference.lora_widths,
        description=f"Found in the models folder ({family.value}).",
    )


class ModelRegistry:
    """Built-in presets, then those found in a models folder, then those of an optional TOML
    file (``[[models]]`` tables); a later one of the same name replaces an earlier one."""

    def __init__(self, presets: list[ModelPreset] | tuple[ModelPreset, ...], *,
                 origins: dict[str, PresetOrigin] | None = None,
                 models_dir: Path | None = None) -> None:
        self._presets = {preset.name: preset for preset in presets}
        self.origins = origins or {}
        self.models_dir = models_dir

    @classmethod
    def load(cls, models_file: Path | None = None,
             models_dir: Path | None = None) -> ModelRegistry:
        presets = {preset.name: preset for preset in BUILTIN_PRESETS}
        origins = dict.fromkeys(presets, PresetOrigin.BUILTIN)
        if models_dir is not None:
            from shared.modelfiles import scan_models_dir  # lazily: it imports this module

            models_dir = models_dir.resolve()
            for name, family, path in scan_models_dir(models_dir):
                if origins.get(name) == PresetOrigin.BUILTIN:
                    logger.warning("%s in the models folder replaces the built-in preset %r",
                                   path.name, name)
                presets[name] = scanned_preset(name, family, path)
                origins[name] = PresetOrigin.MODELS_DIR
        if models_file is not None:
            with models_file.open("rb") as fh:
                data = tomllib.load(fh)
            for entry in data.get("models", []):
                preset = ModelPreset.model_validate(entry)
                presets[preset.name] = preset
                origins[preset.name] = PresetOrigin.MODELS_FILE
        return cls(list(presets.values()), origins=origins, models_dir=models_dir)

    def get(self, name: str) -> ModelPreset | None:
        return self._presets.get(name)

    def names(self) -> list[str]:
        return sorted(self._presets)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._presets.values())

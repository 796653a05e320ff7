"""Whether a LoRA fits a model, and its name when an upload gives none: the gateway's calls.

:mod:`.inspection` says what a file adapts; deciding that it cannot apply to a model is done
here, at upload and at submission, so a wrong file is refused rather than failing a job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from services.gateway.loras.inspection import (
    DENOISER_FAMILIES,
    REAL_WIDTHS,
    Denoiser,
    LoraInfo,
    LoraRejected,
)
from shared.models import BUILTIN_PRESETS, ModelFamily, ModelPreset

_NAME_FORBIDDEN = re.compile(r"[^A-Za-z0-9._-]+")
_FAMILY_NAMES = {ModelFamily.SD15: "SD1.5", ModelFamily.SDXL: "SDXL", ModelFamily.FLUX: "Flux"}


def lora_name_from_filename(filename: str | None) -> str:
    """A valid name from an uploaded file's name (``My Style v2.safetensors`` ->
    ``My_Style_v2``), for uploads that give none."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    return _NAME_FORBIDDEN.sub("_", stem).lstrip(".")[:64] or "lora"


def _describe_width(width: int, denoiser: Denoiser) -> str:
    if width in REAL_WIDTHS[denoiser]:
        return REAL_WIDTHS[denoiser][width][0]
    presets = [preset.name for preset in BUILTIN_PRESETS
               if preset.lora_dim == width and preset.family in DENOISER_FAMILIES[denoiser]]
    return f"as in {', '.join(presets)}" if presets else "no model we know"


def check_lora_for_model(info: LoraInfo, preset: ModelPreset) -> None:
    """Refuse a LoRA that cannot apply to ``preset``, at upload rather than as a failed job.

    Raises ``LoraRejected(code="wrong_family")`` with a message naming what was found and
    what the model expects.
    """
    family = _FAMILY_NAMES[preset.family]
    if info.denoiser == "flux" and preset.family is not ModelFamily.FLUX:
        raise LoraRejected(f"This LoRA is for Flux (it adapts '{info.denoiser_key}'); "
                           f"{preset.name} is an {family} model.", code="wrong_family")
    if info.denoiser == "unet" and preset.family is ModelFamily.FLUX:
        raise LoraRejected(f"This LoRA is for a Stable Diffusion UNet (it adapts "
                           f"'{info.denoiser_key}'); {preset.name} is a Flux model.",
                           code="wrong_family")
    if info.sdxl_marker is not None and preset.family is ModelFamily.SD15:
        raise LoraRejected(f"This LoRA is for SDXL ({info.sdxl_marker_reason}: "
                           f"'{info.sdxl_marker}'); {preset.name} is an SD1.5 model.",
                           code="wrong_family")
    if preset.lora_dim is not None and info.denoiser is not None:
        wrong = sorted(width for width in info.dims if width != preset.lora_dim)
        if wrong:
            what = "attention" if info.denoiser == "flux" else "cross-attention"
            found = _describe_width(wrong[0], info.denoiser)
            raise LoraRejected(f"This LoRA's {what} width is {wrong[0]} ({found}); "
                               f"{preset.name} expects {preset.lora_dim}.", code="wrong_family")
    mismatch = width_mismatch(info.widths, preset)
    if mismatch is not None:
        raise LoraRejected(f"This LoRA {mismatch}.", code="wrong_family")


def width_mismatch(widths: Mapping[str, Iterable[int]], preset: ModelPreset) -> str | None:
    """Why a LoRA with these layer widths (``LoraInfo.widths``, as recorded at upload) cannot
    load into ``preset``, or None when every width is one the model's layers have.

    Checked in both directions of a mix-up: a full-size model's LoRA on a small model, and a
    small model's LoRA on a full-size one. Components the preset does not describe pass.
    """
    for component, found in widths.items():
        known = preset.lora_widths.get(component)
        if not known:
            continue
        foreign = sorted(set(found) - set(known))
        if foreign:
            return (f"adapts {component} layers {', '.join(map(str, foreign[:3]))} wide, which "
                    f"{preset.name} does not have (its {component} layers are "
                    f"{', '.join(map(str, known))} wide): it was made for another model")
    return None

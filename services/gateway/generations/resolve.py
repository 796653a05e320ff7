"""A generation spec checked against its model preset, with every server-chosen field filled.

It runs before a job is queued, so a spec its preset cannot serve is a 422 naming the field
and the worker receives a spec with nothing left to choose. The structural rules (types,
ranges) live on :class:`shared.specs.GenerationSpec` itself.
"""

from __future__ import annotations

import secrets
from typing import Any

from shared.errors import ValidationFailed
from shared.models import ModelRegistry, canonical_scheduler
from shared.specs import MAX_SEED, GenerationMode, GenerationSpec


def _fit_size(size: tuple[int, int], *, max_size: int, min_size: int,
              multiple: int = 8) -> tuple[int, int]:
    """An input image's size as a generation size: within the preset's limits, and a multiple
    of what the family's latents need."""
    w, h = size
    scale = min(1.0, max_size / max(w, h))
    w, h = round(w * scale), round(h * scale)
    return max(min_size, w - w % multiple), max(min_size, h - h % multiple)


def resolve_generation(
    spec: GenerationSpec, *, registry: ModelRegistry, default_model: str,
    input_size: tuple[int, int] | None = None,
) -> GenerationSpec:
    """Check the spec against its model preset and fill every field the server chooses.

    ``input_size`` is the init image's size: img2img and inpaint default to it (scaled into
    the preset's limits), and outpainting's canvas is it plus the added borders.
    """
    errors: list[dict[str, Any]] = []
    model_name = spec.model or default_model
    preset = registry.get(model_name)
    if preset is None:
        raise ValidationFailed([{
            "field": "model",
            "message": f"unknown model {model_name!r}; known: {', '.join(registry.names())}",
        }])
    limits = preset.limits
    default_w = default_h = limits.default_size
    if input_size is not None:
        default_w, default_h = _fit_size(input_size, max_size=limits.max_size,
                                         min_size=limits.min_size, multiple=limits.size_multiple)
    if spec.mode == GenerationMode.OUTPAINT and spec.outpaint is not None:
        pad = spec.outpaint
        default_w += pad.left + pad.right
        default_h += pad.top + pad.bottom
        for field, given, derived in (("width", spec.width, default_w),
                                      ("height", spec.height, default_h)):
            if given is not None and given != derived:
                errors.append({"field": field, "message": f"outpainting makes the canvas {derived}"
                               " px (image + borders); leave it out or send that value"})
    width = spec.width or default_w
    height = spec.height or default_h
    for field, value in (("width", width), ("height", height)):
        if not limits.min_size <= value <= limits.max_size:
            errors.append({
                "field": field,
                "message": f"{model_name} supports {limits.min_size}-{limits.max_size} px",
            })
        elif value % limits.size_multiple:
            errors.append({"field": field, "message": f"{preset.family.value} models need a "
                           f"multiple of {limits.size_multiple} px (got {value})"})
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
    if spec.eta is not None and scheduler != "DDIM":
        errors.append({"field": "eta", "message": "eta applies to the DDIM scheduler only; set "
                       "scheduler to 'DDIM' or leave eta out"})
    for index, control in enumerate(spec.controls):
        if control.type not in preset.controlnets:
            have = ", ".join(sorted(preset.controlnets)) or "none"
            errors.append({"field": f"controls.{index}.type", "message": f"{model_name} has no "
                           f"{control.type.value} ControlNet (available: {have})"})
    strength = spec.strength
    if strength is None and spec.mode != GenerationMode.TXT2IMG:
        strength = 0.75 if spec.mode == GenerationMode.IMG2IMG else 1.0
    if strength is not None and int(steps * strength) < 1:
        # diffusers denoises int(steps * strength) steps; zero would fail in the worker.
        errors.append({"field": "strength", "message": f"strength {strength} x {steps} steps "
                       "leaves no denoising step; raise strength or steps"})
    if errors:
        raise ValidationFailed(errors)
    return spec.model_copy(update={
        "strength": strength,
        "model": model_name,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance_scale": (spec.guidance_scale if spec.guidance_scale is not None
                           else limits.default_guidance),
        "seed": spec.seed if spec.seed is not None else secrets.randbelow(MAX_SEED + 1),
        "scheduler": scheduler,
    })

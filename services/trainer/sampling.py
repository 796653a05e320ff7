"""Preview images during training, as kohya's ``--sample_prompts``: rendered by the very pipeline
being trained, each with a fresh scheduler and its own seed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from PIL import Image

from shared.models import SCHEDULERS

# kohya sampler (shared.kohya.KOHYA_SAMPLERS) -> the Loomis scheduler (shared.models.SCHEDULERS)
# built from the same diffusers class with the same settings as kohya's sample_images:
# "dpmsolver" is DPMSolverMultistep with algorithm_type="dpmsolver" (not ++), "dpmsingle" the
# single-step solver, "dpm_2*" KDPM2.
KOHYA_TO_LOOMIS_SCHEDULER: Mapping[str, str] = MappingProxyType({
    "ddim": "DDIM", "pndm": "PNDM", "lms": "LMS", "k_lms": "LMS", "euler": "Euler", "k_euler": "Euler",
    "euler_a": "Euler a", "k_euler_a": "Euler a", "heun": "Heun", "dpmsolver++": "DPM++ 2M",
    "dpmsolver": "DPM 2M", "dpmsingle": "DPM++ 2S", "dpm_2": "DPM2", "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a", "k_dpm_2_a": "DPM2 a",
})


@dataclass(frozen=True)
class SamplePrompt:
    """One preview image rendered during training (kohya's ``--sample_prompts`` line)."""

    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int = 0
    scale: float = 7.0
    steps: int = 20
    # a shared.models.SCHEDULERS name (kohya's sampler, mapped); None keeps the model's own
    scheduler: str | None = None


def sample_scheduler(own: Any, name: str | None) -> Any:
    """A fresh scheduler per image (they keep per-run state), on the model's own beta
    schedule and prediction type, as kohya's sample_images builds its sampler."""
    import diffusers

    if name is None:
        return type(own).from_config(own.config)
    class_name, extra = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(own.config, **extra)


@torch.no_grad()
def render_samples(pipe: Any, prompts: Sequence[SamplePrompt], *, device: torch.device,
                   clip_skip: int | None, autocast: Callable[[], AbstractContextManager[Any]],
                   on_image: Callable[[int, Image.Image], None]) -> None:
    """Render each prompt with ``pipe``, handing ``on_image(index, image)`` each; the pipeline's
    own scheduler is put back however it ends."""
    own_scheduler = pipe.scheduler
    try:
        for index, spec in enumerate(prompts):
            pipe.scheduler = sample_scheduler(own_scheduler, spec.scheduler)
            generator = torch.Generator(device).manual_seed(spec.seed)
            with autocast():
                image = pipe(
                    spec.prompt, negative_prompt=spec.negative or None, width=spec.width,
                    height=spec.height, num_inference_steps=spec.steps, guidance_scale=spec.scale,
                    generator=generator,
                    clip_skip=(clip_skip - 1) if clip_skip and clip_skip > 1 else None,
                ).images[0]
            on_image(index, image)
    finally:
        pipe.scheduler = own_scheduler

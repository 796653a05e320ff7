"""Turning a resolved spec into images on a loaded pipeline, and images into PNG files."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from services.generator.pipelines import LoadedModel
from shared.specs import TextToImageSpec

StepHook = Callable[[int, int], None]


@dataclass
class RenderResult:
    images: list[Image.Image]
    seeds: list[int]
    scheduler: str
    seconds: float


def render(loaded: LoadedModel, spec: TextToImageSpec, *, on_step: StepHook) -> RenderResult:
    """Run the pipeline; image i uses seed + i on a CPU generator so seeds travel across devices.

    ``on_step`` runs after every denoising step and may raise to stop the run (cancel).
    """
    assert spec.seed is not None and spec.steps is not None
    seeds = [spec.seed + i for i in range(spec.num_images)]
    total = spec.steps

    def step_end(_pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        on_step(step + 1, total)
        return kwargs

    with loaded.lock:  # one pipeline call at a time: schedulers and LoRA state are shared
        scheduler = loaded.use_scheduler(spec.scheduler)
        started = time.perf_counter()
        with torch.inference_mode():
            output = loaded.pipe(
                prompt=[spec.prompt] * spec.num_images,
                negative_prompt=[spec.negative_prompt] * spec.num_images,
                width=spec.width, height=spec.height, num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                callback_on_step_end=step_end,
            )
        seconds = time.perf_counter() - started
    return RenderResult(images=list(output.images), seeds=seeds, scheduler=scheduler,
                        seconds=seconds)


def a1111_parameters(spec: TextToImageSpec, *, seed: int, scheduler: str, model: LoadedModel) -> str:
    """The ``parameters`` text that AUTOMATIC1111 writes and that image browsers parse."""
    lines = [spec.prompt]
    if spec.negative_prompt:
        lines.append(f"Negative prompt: {spec.negative_prompt}")
    lines.append(
        f"Steps: {spec.steps}, Sampler: {scheduler}, CFG scale: {spec.guidance_scale}, "
        f"Seed: {seed}, Size: {spec.width}x{spec.height}, Model hash: {model.sha256[:10]}, "
        f"Model: {model.preset.name}"
    )
    return "\n".join(lines)


def encode_png(image: Image.Image, *, parameters: str, loomis: dict[str, Any]) -> bytes:
    info = PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("loomis", json.dumps(loomis, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()

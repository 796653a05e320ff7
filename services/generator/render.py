"""Turning resolved specs into images on a loaded pipeline, and images into PNG files.

One call renders one or more specs that share everything a pipeline call shares (model,
mode, size, steps, guidance, scheduler, LoRA set, control types): prompts, seeds and input
images may differ, so the worker can batch compatible jobs. Each image gets its own CPU
generator seeded ``seed + i``, so an image's pixels depend on its seed, not on its batch.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from services.generator.invariance import per_job_calls
from services.generator.loras import LoraAdapterCache
from services.generator.outpaint import outpaint_canvas
from services.generator.pipelines import LoadedModel
from shared.specs import GenerationMode, GenerationSpec, LoraRef

StepHook = Callable[[int, int], None]


@dataclass
class PreparedInputs:
    """A spec's images at the generation size, ready for the pipeline."""

    init: Image.Image | None = None
    mask: Image.Image | None = None
    original: Image.Image | None = None  # what compositing restores outside the mask
    controls: list[Image.Image] = field(default_factory=list)


@dataclass
class RenderResult:
    images: list[Image.Image]
    seeds: list[int]
    scheduler: str
    seconds: float
    pipeline: str
    loras: list[dict[str, Any]]
    prompt_encoding: str
    batch_jobs: int = 1  # how many jobs shared the pipeline call
    # Per image, when a pipeline still runs diffusers' safety checker (Loomis loads them
    # without it): a flagged image comes back black, and the job must say so.
    nsfw_content_detected: list[bool] | None = None


def control_image(
    kind: str, image: Image.Image | None, *, size: tuple[int, int], low: int = 100,
    high: int = 200, keypoints: dict[str, Any] | None = None, preprocess: bool = True,
    model_cache: Path, resolve: Callable[[str], Path], depth_model: str,
) -> Image.Image:
    """The conditioning image for one control, at the generation size."""
    from services.generator import control

    if keypoints is not None:
        people, width, height = control.parse_openpose_json(keypoints, default_size=size)
        result = control.render_openpose(people, width=width, height=height)
    elif image is None:
        raise control.PreprocessError(f"{kind} needs an image")
    elif not preprocess:
        result = image
    elif kind == "depth":
        result = control.depth(image.convert("RGB").resize(size), model_dir=resolve(depth_model))
    elif kind == "canny":
        result = control.canny(image.convert("RGB").resize(size), low=low, high=high)
    else:
        result = control.preprocess(kind, image.convert("RGB").resize(size), params={},
                                    model_cache=model_cache)
    return result.convert("RGB").resize(size, Image.Resampling.BILINEAR)


def prepare_inputs(
    spec: GenerationSpec, raw: dict[str, Image.Image], *, model_cache: Path,
    resolve: Callable[[str], Path], depth_model: str,
) -> PreparedInputs:
    """Resize inputs to the generation size, build outpainting canvases, run preprocessors."""
    assert spec.width is not None and spec.height is not None
    size = (spec.width, spec.height)
    prepared = PreparedInputs()
    init = raw.get("init_image")
    if spec.mode == GenerationMode.OUTPAINT and init is not None and spec.outpaint is not None:
        pad = spec.outpaint
        inner = (spec.width - pad.left - pad.right, spec.height - pad.top - pad.bottom)
        canvas, mask = outpaint_canvas(
            init.convert("RGB").resize(inner, Image.Resampling.LANCZOS), left=pad.left,
            right=pad.right, top=pad.top, bottom=pad.bottom, feather=pad.feather)
        prepared.init, prepared.mask, prepared.original = canvas, mask, canvas
    elif init is not None:
        prepared.init = init.convert("RGB").resize(size, Image.Resampling.LANCZOS)
        prepared.original = prepared.init
        if "mask" in raw:
            prepared.mask = raw["mask"].convert("L").resize(size, Image.Resampling.BILINEAR)
    for index, spec_control in enumerate(spec.controls):
        prepared.controls.append(control_image(
            spec_control.type.value, raw.get(f"controls.{index}.image"), size=size,
            low=spec_control.low_threshold, high=spec_control.high_threshold,
            keypoints=spec_control.keypoints, preprocess=spec_control.preprocess,
            model_cache=model_cache, resolve=resolve, depth_model=depth_model,
        ))
    return prepared


def batch_key(spec: GenerationSpec, loras: list[LoraRef]) -> tuple[Any, ...]:
    """Specs with equal keys can share one pipeline call (the worker's batching)."""
    return (spec.model, spec.mode, spec.width, spec.height, spec.steps, spec.guidance_scale,
            spec.scheduler, spec.eta, spec.strength, tuple((lora.sha256, lora.weight) for lora in loras))


def _call_parameters(pipe: Any) -> set[str]:
    return set(inspect.signature(pipe.__call__).parameters)


def _prompt_kwargs(pipe: Any, loaded: LoadedModel, specs: list[GenerationSpec],
                   params: set[str]) -> tuple[dict[str, Any], str]:
    """Plain strings where diffusers' own encoding is exact; weighted/chunked embeddings where
    the prompt uses ``(word:1.3)`` syntax or is longer than the text encoder's 77 tokens."""
    prompts = [s.prompt for s in specs for _ in range(s.num_images)]
    negatives = [s.negative_prompt for s in specs for _ in range(s.num_images)]
    family = loaded.preset.family.value
    if family in ("sd15", "sdxl"):
        from services.generator import prompts as weighting

        tokenizer = pipe.tokenizer or getattr(pipe, "tokenizer_2", None)
        if weighting.supports_prompt_weighting(pipe) and any(
                weighting.needs_custom_encoding(s.prompt, s.negative_prompt, tokenizer)
                for s in specs):
            spec = specs[0]
            if any((s.prompt, s.negative_prompt) != (spec.prompt, spec.negative_prompt)
                   for s in specs):
                raise ValueError("weighted prompts are rendered one job at a time")
            embeds = weighting.encode_prompts(pipe, prompt=spec.prompt,
                                              negative_prompt=spec.negative_prompt,
                                              num_images=len(prompts))
            return embeds, "weighted"
        return {"prompt": prompts, "negative_prompt": negatives}, "plain"
    kwargs: dict[str, Any] = {"prompt": prompts}
    if any(negatives) and "negative_prompt" in params:
        kwargs["negative_prompt"] = negatives
    if "max_sequence_length" in params and getattr(pipe, "tokenizer_2", None) is not None:
        kwargs["max_sequence_length"] = min(512, int(pipe.tokenizer_2.model_max_length))
    return kwargs, "plain"


def render(
    loaded: LoadedModel, specs: list[GenerationSpec], prepared: list[PreparedInputs], *,
    loras: list[LoraRef], lora_cache: LoraAdapterCache, on_step: StepHook, exact: bool = True,
) -> RenderResult:
    """Run one pipeline call for ``specs`` (compatible by :func:`batch_key`).

    ``on_step`` runs after every denoising step and may raise to stop the run (cancel).
    """
    first = specs[0]
    assert first.seed is not None and first.steps is not None
    seeds = [s.seed + i for s in specs for i in range(s.num_images)]  # type: ignore[operator]
    images_per = [s.num_images for s in specs]

    def repeat(values: list[Any]) -> list[Any]:
        return [v for v, n in zip(values, images_per, strict=True) for _ in range(n)]

    mode = first.mode.value
    pipeline_mode = "inpaint" if mode == "outpaint" else mode
    control_types = tuple(c.type.value for c in first.controls)
    with loaded.lock:  # one pipeline call at a time: schedulers and LoRA state are shared
        # LoRAs are trained on the base denoiser, so inpainting with LoRAs takes the base
        # model's inpainting path rather than a dedicated inpainting UNet.
        pipe = loaded.pipeline_for(pipeline_mode, control_types, dedicated_inpaint=not loras)
        used_loras = lora_cache.activate(loaded.pipe, loras)
        scheduler = loaded.use_scheduler(first.scheduler, pipe)
        params = _call_parameters(pipe)
        kwargs, encoding = _prompt_kwargs(pipe, loaded, specs, params)
        kwargs.update(num_inference_steps=first.steps, guidance_scale=first.guidance_scale,
                      generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])
        if "width" in params:
            kwargs.update(width=first.width, height=first.height)
        if first.eta is not None and "eta" in params:
            kwargs["eta"] = first.eta  # read by DDIMScheduler.step (the gateway requires DDIM)
        if mode != "txt2img":
            kwargs["image"] = repeat([p.init for p in prepared])
            kwargs["strength"] = first.strength
        if pipeline_mode == "inpaint":
            kwargs["mask_image"] = repeat([p.mask for p in prepared])
        if control_types:
            # One conditioning image per ControlNet, shared by every image of the call (the
            # pipelines repeat it over the batch): jobs with controls are never grouped.
            controls_of = prepared[0].controls
            control_images: Any = controls_of[0] if len(control_types) == 1 else list(controls_of)
            kwargs["control_image" if "control_image" in params else "image"] = control_images
            scales = [c.scale for c in first.controls]
            starts = [c.start for c in first.controls]
            ends = [c.end for c in first.controls]
            single = len(control_types) == 1
            kwargs["controlnet_conditioning_scale"] = scales[0] if single else scales
            kwargs["control_guidance_start"] = starts[0] if single else starts
            kwargs["control_guidance_end"] = ends[0] if single else ends
            if not single and "control_mode" in params:
                # diffusers 0.42's Flux multi-ControlNet img2img/inpaint needs it spelled out.
                kwargs["control_mode"] = [None] * len(control_types)
        total = first.steps
        if mode != "txt2img" and first.strength is not None:
            total = max(1, int(first.steps * first.strength))

        def step_end(_pipe: Any, step: int, _timestep: Any,
                     cb_kwargs: dict[str, Any]) -> dict[str, Any]:
            on_step(min(step + 1, total), total)
            return cb_kwargs

        kwargs["callback_on_step_end"] = step_end
        started = time.perf_counter()
        split = per_job_calls(pipe, images_per) if exact else contextlib.nullcontext()
        with torch.inference_mode(), split:
            output = pipe(**kwargs)
        seconds = time.perf_counter() - started
    images = list(output.images)
    flagged = getattr(output, "nsfw_content_detected", None)
    if pipeline_mode == "inpaint":
        originals = repeat([p.original for p in prepared])
        masks = repeat([p.mask for p in prepared])
        composite = repeat([s.composite for s in specs])
        images = [
            Image.composite(image.convert("RGB"), original, mask) if keep and original else image
            for image, original, mask, keep in zip(images, originals, masks, composite, strict=True)
        ]
    return RenderResult(images=images, seeds=seeds, scheduler=scheduler, seconds=seconds,
                        pipeline=type(pipe).__name__, loras=used_loras, prompt_encoding=encoding,
                        nsfw_content_detected=None if flagged is None else [bool(f) for f in flagged])


def a1111_parameters(spec: GenerationSpec, *, seed: int, scheduler: str, model: LoadedModel,
                     loras: list[dict[str, Any]] | None = None) -> str:
    """The ``parameters`` text that AUTOMATIC1111 writes and that image browsers parse."""
    prompt = spec.prompt + "".join(f" <lora:{lora['name']}:{lora['weight']}>" for lora in loras or [])
    lines = [prompt]
    if spec.negative_prompt:
        lines.append(f"Negative prompt: {spec.negative_prompt}")
    fields = [
        f"Steps: {spec.steps}", f"Sampler: {scheduler}", f"CFG scale: {spec.guidance_scale}",
        f"Seed: {seed}", f"Size: {spec.width}x{spec.height}",
        f"Model hash: {model.sha256[:10]}", f"Model: {model.preset.name}",
    ]
    if spec.eta:
        fields.append(f"Eta DDIM: {spec.eta}")  # webui writes it when not its default, 0
    if spec.strength is not None:
        fields.append(f"Denoising strength: {spec.strength}")
    if spec.mode != GenerationMode.TXT2IMG:
        fields.append(f"Mode: {spec.mode.value}")
    for index, control in enumerate(spec.controls):
        fields.append(f'ControlNet {index}: "Module: {control.type.value}, Weight: {control.scale}, '
                      f'Guidance Start: {control.start}, Guidance End: {control.end}"')
    lines.append(", ".join(fields))
    return "\n".join(lines)


def encode_png(image: Image.Image, *, parameters: str, loomis: dict[str, Any]) -> bytes:
    info = PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("loomis", json.dumps(loomis, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()

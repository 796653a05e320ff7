"""One generation job's body: load the model, fetch inputs and LoRAs, render through the
batcher (compatible jobs share one pipeline call), filter, and write images and manifest.

Sweeps render each cell through the same :func:`render_task`.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from PIL import Image
from pydantic import BaseModel, Field

from services.generator.artifacts import put_artifact
from services.generator.batching import BatchItem
from services.generator.context import GeneratorContext
from services.generator.control import PreprocessError
from services.generator.pipelines import LoadedModel
from services.generator.render import (
    PreparedInputs,
    RenderResult,
    a1111_parameters,
    batch_key,
    encode_png,
    prepare_inputs,
    render,
)
from services.jobrunner import RUNNING
from shared.errors import JobCanceled, JobFailure, NotFound
from shared.keys import manifest_key, output_key
from shared.models import canonical_scheduler
from shared.outcomes import GenerationOutcome, GenerationSucceeded
from shared.specs import ArtifactRef, GenerationSpec, GenerationTask, LoraRef
from shared.storage import ObjectStore

logger = logging.getLogger(__name__)


class GenerationManifest(BaseModel):
    """Everything needed to reproduce an output, stored beside it as ``manifest.json``."""

    job_id: str
    tenant_id: str
    spec: GenerationSpec
    model: dict[str, Any]
    scheduler: str
    seeds: list[int]
    images: list[ArtifactRef]
    versions: dict[str, str]
    device: str
    timings: dict[str, float]
    created_at: datetime
    pipeline: str = ""
    inputs: dict[str, str] = Field(default_factory=dict)
    loras: list[dict[str, Any]] = Field(default_factory=list)
    safety: list[dict[str, Any]] = Field(default_factory=list)
    prompt_encoding: str = "plain"
    # Per image, only when a pipeline ran diffusers' own checker (which blacks out what it
    # flags); Loomis loads pipelines without it, so this is normally absent.
    nsfw_content_detected: list[bool] | None = None


async def load_inputs(store: ObjectStore, inputs: dict[str, str]) -> dict[str, Image.Image]:
    """The gateway stored every input as a checked PNG; a missing one fails the job clearly."""
    raw: dict[str, Image.Image] = {}
    for name, key in inputs.items():
        try:
            data = await store.get(key)
        except NotFound as exc:
            raise JobFailure(f"input {name} is no longer in storage ({key})",
                             code="input_missing") from exc
        image = Image.open(io.BytesIO(data))
        image.load()
        raw[name] = image
    return raw


async def _fetch_loras(ctx: dict[str, Any], loras: list[LoraRef]) -> None:
    files = GeneratorContext.of(ctx).lora_files
    store = GeneratorContext.of(ctx).store
    for lora in loras:
        if files.has(lora.sha256):
            continue
        try:
            data = await store.get(lora.key)
        except NotFound as exc:
            raise JobFailure(f"LoRA {lora.name!r} was deleted", code="lora_missing") from exc
        if hashlib.sha256(data).hexdigest() != lora.sha256:
            raise JobFailure(f"LoRA {lora.name!r} does not match its recorded hash",
                             code="lora_invalid")
        await asyncio.to_thread(files.save, lora.sha256, data)


def run_batch(ctx: dict[str, Any], items: list[BatchItem], on_step: Any) -> list[RenderResult]:
    """One pipeline call for a group of compatible jobs; the result is split back per job."""
    jobs: list[_Job] = [item.payload for item in items]
    loaded = jobs[0].loaded
    specs = [j.task.spec for j in jobs]
    prepared = [j.prepared for j in jobs]
    combined = render(loaded, specs, prepared, loras=jobs[0].task.loras,
                      lora_cache=GeneratorContext.of(ctx).lora_cache, on_step=on_step,
                      exact=GeneratorContext.of(ctx).settings.generator.batch_exact)
    results: list[RenderResult] = []
    offset = 0
    for job in jobs:
        n = job.task.spec.num_images
        results.append(RenderResult(
            images=combined.images[offset:offset + n], seeds=combined.seeds[offset:offset + n],
            scheduler=combined.scheduler, seconds=combined.seconds, pipeline=combined.pipeline,
            # Grouped jobs share LoRA files by hash, not ids: report each job's own LoRAs.
            loras=[{**used, "id": ref.id, "name": ref.name}
                   for used, ref in zip(combined.loras, job.task.loras, strict=True)],
            prompt_encoding=combined.prompt_encoding,
            batch_jobs=len(jobs),
            nsfw_content_detected=(None if combined.nsfw_content_detected is None
                                   else combined.nsfw_content_detected[offset:offset + n]),
        ))
        offset += n
    if len(jobs) > 1:
        logger.info("rendered a batch of %d jobs in %.2fs", len(jobs), combined.seconds)
    return results


@dataclass
class _Job:
    task: GenerationTask
    loaded: LoadedModel
    prepared: PreparedInputs


def _batch_key(loaded: LoadedModel, task: GenerationTask) -> tuple[Any, ...]:
    spec = task.spec
    key = batch_key(spec, task.loras)
    if spec.controls:
        return (*key, task.job_id)  # control images are per job; they are not batched
    if loaded.preset.family.value in ("sd15", "sdxl"):
        from services.generator.prompts import needs_custom_encoding

        if needs_custom_encoding(spec.prompt, spec.negative_prompt, loaded.pipe.tokenizer):
            return (*key, task.job_id)  # weighted prompts are encoded one job at a time
    return key


@dataclass
class Rendered:
    result: RenderResult
    loaded: LoadedModel
    images: list[Image.Image | None]  # after the safety filter: None where withheld
    safety: list[dict[str, Any]]
    model_ready_s: float


async def render_task(
    ctx: dict[str, Any], task: GenerationTask, *,
    progress: Callable[[int, int], Awaitable[None]],
) -> Rendered:
    """Load, prepare inputs, render (through the batcher) and filter one spec's images."""
    events = GeneratorContext.of(ctx).events
    store = GeneratorContext.of(ctx).store
    settings = GeneratorContext.of(ctx).settings
    spec = task.spec
    loop = asyncio.get_running_loop()

    t0 = time.perf_counter()
    async with GeneratorContext.of(ctx).render_slot:
        # a queued spec is resolved (the gateway names its model); the cache reports a missing one
        loaded: LoadedModel = await asyncio.to_thread(GeneratorContext.of(ctx).cache.get,
                                                      cast(str, spec.model))
    raw = await load_inputs(store, task.inputs)
    evictor = GeneratorContext.of(ctx).lora_evictor
    if task.loras:
        await evictor.catch_up()  # applied even if the background follower lags
    # Pinned until rendered: a deletion arriving meanwhile evicts the file after this job.
    with evictor.pinned(lora.sha256 for lora in task.loras):
        await _fetch_loras(ctx, task.loras)
        try:
            prepared = await asyncio.to_thread(
                prepare_inputs, spec, raw, model_cache=settings.model_cache,
                resolve=GeneratorContext.of(ctx).cache.resolve_source,
                depth_model=settings.generator.depth_model)
        except PreprocessError as exc:
            raise JobFailure(str(exc), code="preprocess_failed") from exc
        model_ready_s = time.perf_counter() - t0

        async def step_hook(step: int, total: int) -> None:
            if await events.cancel_requested(task.job_id):
                raise JobCanceled()
            await progress(step, total)

        abandoned = threading.Event()

        def on_step(step: int, total: int) -> None:
            if abandoned.is_set():  # the job timed out: stop burning the GPU on it
                raise JobCanceled()
            asyncio.run_coroutine_threadsafe(step_hook(step, total), loop).result()

        batcher = GeneratorContext.of(ctx).batcher
        item = BatchItem(key=_batch_key(loaded, task), payload=_Job(task, loaded, prepared),
                         on_step=on_step)
        try:
            result: RenderResult = await batcher.submit(item)
        finally:
            abandoned.set()

    images: list[Image.Image | None] = list(result.images)
    safety: list[dict[str, Any]] = []
    if task.safety is not None:
        verdicts = await asyncio.to_thread(
            GeneratorContext.of(ctx).safety.apply, result.images, threshold=task.safety.threshold,
            action=task.safety.action)
        images = [v.image for v in verdicts]
        safety = [{"index": i, "score": round(v.score, 4), "flagged": v.flagged,
                   "action": task.safety.action if v.flagged else None}
                  for i, v in enumerate(verdicts)]
    return Rendered(result=result, loaded=loaded, images=images, safety=safety,
                    model_ready_s=model_ready_s)


def as_run(spec: GenerationSpec, *, scheduler: str) -> GenerationSpec:
    """The spec with the model's own scheduler filled in where the client left it to the model
    (only the worker knows it), so the recorded spec reproduces the run even if the model's
    default changes; a scheduler that is not one of ours cannot be named in a spec."""
    if spec.scheduler is not None or canonical_scheduler(scheduler) != scheduler:
        return spec
    return spec.model_copy(update={"scheduler": scheduler})


async def run_generation(ctx: dict[str, Any], task: GenerationTask, *, queued_s: float) -> dict[str, Any]:
    events = GeneratorContext.of(ctx).events
    store = GeneratorContext.of(ctx).store
    spec = task.spec
    timings: dict[str, float] = {"queue_wait_s": round(queued_s, 4)}

    async def progress(step: int, total: int) -> None:
        await events.emit(task.job_id, "progress", allowed_from=RUNNING,
                          data={"step": step, "total_steps": total,
                                "progress": round(step / total, 4)})

    rendered = await render_task(ctx, task, progress=progress)
    result, loaded, images, safety = (rendered.result, rendered.loaded, rendered.images,
                                      rendered.safety)
    timings["model_ready_s"] = round(rendered.model_ready_s, 4)
    timings["pipeline_s"] = round(result.seconds, 4)
    spec = as_run(spec, scheduler=result.scheduler)

    t1 = time.perf_counter()
    refs: list[ArtifactRef] = []
    for index, (image, seed) in enumerate(zip(images, result.seeds, strict=True)):
        if image is None:
            continue  # withheld by the safety filter: never stored
        png = encode_png(
            image,
            parameters=a1111_parameters(spec, seed=seed, scheduler=result.scheduler, model=loaded,
                                        loras=result.loras),
            loomis={"job_id": task.job_id, "index": index, "seed": seed,
                    "spec": spec.model_dump(mode="json")},
        )
        ref = await put_artifact(store, output_key(task.tenant_id, task.job_id, index), png, "image/png")
        refs.append(ref.model_copy(update={"index": index, "width": image.width,
                                           "height": image.height, "seed": seed}))
    timings["upload_s"] = round(time.perf_counter() - t1, 4)
    manifest = GenerationManifest(
        job_id=task.job_id, tenant_id=task.tenant_id, spec=spec, model=loaded.describe(),
        scheduler=result.scheduler, seeds=result.seeds, images=refs,
        versions=GeneratorContext.of(ctx).versions,
        device=loaded.device, timings=timings, created_at=datetime.now(UTC),
        pipeline=result.pipeline, inputs=task.inputs, loras=result.loras, safety=safety,
        prompt_encoding=result.prompt_encoding,
        nsfw_content_detected=result.nsfw_content_detected,
    )
    # The manifest goes last: its presence means every image it lists is in place.
    manifest_ref = await put_artifact(store, manifest_key(task.tenant_id, task.job_id),
                              manifest.model_dump_json(indent=2).encode(), "application/json")
    summary: dict[str, Any] = {
        "timings": timings, "seeds": result.seeds, "scheduler": result.scheduler,
        "model": {"name": loaded.preset.name, "sha256": loaded.sha256},
        "device": loaded.device, "dtype": loaded.dtype, "pipeline": result.pipeline,
        "loras": result.loras, "prompt_encoding": result.prompt_encoding,
        "batch_jobs": result.batch_jobs,
    }
    if loaded.dtype_note:
        summary["dtype_note"] = loaded.dtype_note
    if result.nsfw_content_detected is not None:
        summary["nsfw_content_detected"] = result.nsfw_content_detected
    if safety:
        summary["safety"] = safety
        summary["withheld"] = [s["index"] for s in safety if s["action"] == "withhold"]
    outcome = GenerationSucceeded(artifacts=[*refs, manifest_ref],
                                result=GenerationOutcome.model_validate(summary))
    if spec.scheduler != task.spec.scheduler:  # onto the job's recorded spec too
        outcome.spec_filled = {"scheduler": spec.scheduler}
    return outcome.event_data()

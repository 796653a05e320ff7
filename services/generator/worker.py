"""The generator worker: an arq process that owns one GPU (or the CPU) and runs generations.

Delivery is at-least-once, so a job may run twice (its worker died): every write goes to
keys derived from the job id, and state transitions go through :class:`JobEvents`, which
refuses to leave a terminal state.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import platform
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from arq.worker import Worker, func
from PIL import Image

from services.generator.batching import Batcher, BatchItem
from services.generator.control import PreprocessError
from services.generator.loras import LoraAdapterCache, LoraFiles
from services.generator.pipelines import LoadedModel, PipelineCache
from services.generator.render import (
    PreparedInputs,
    RenderResult,
    a1111_parameters,
    batch_key,
    control_image,
    encode_png,
    prepare_inputs,
    render,
)
from services.jobrunner import RUNNING, common_startup, make_worker, run_job, run_worker
from shared.errors import JobCanceled, JobFailure, LoomisError, NotFound
from shared.events import JobEvents
from shared.keys import (
    contact_sheet_key,
    job_prefix,
    manifest_key,
    output_key,
    sweep_metadata_key,
    upload_key,
)
from shared.models import ModelRegistry, canonical_scheduler
from shared.outcomes import GenerationOutcome, GenerationResult, SweepOutcome, SweepResult
from shared.queue import GENERATE_TASK, GENERATOR_QUEUE, PREPROCESS_TASK, SWEEP_TASK
from shared.settings import Settings, get_settings
from shared.specs import (
    ArtifactRef,
    GenerationManifest,
    GenerationSpec,
    GenerationTask,
    JobKind,
    JobStatus,
    LoraRef,
    PreprocessTask,
    SweepTask,
)
from shared.storage import ObjectStore

logger = logging.getLogger(__name__)

class LazySafetyFilter:
    """The classifier loads on the first job of a tenant that has the filter on."""

    def __init__(self) -> None:
        self._filter: Any = None

    def apply(self, images: list[Image.Image], *, threshold: float, action: str) -> list[Any]:
        if self._filter is None:
            from services.generator.safety import SafetyFilter

            self._filter = SafetyFilter()
        return self._filter.apply(images, threshold=threshold, action=action)  # type: ignore[no-any-return]


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("loomis", "torch", "diffusers", "transformers", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


async def startup(ctx: dict[str, Any]) -> None:
    """Build the shared clients once; warm the default model so the first job does not wait."""
    settings = common_startup(ctx)
    ctx["cache"] = PipelineCache(
        registry=ModelRegistry.load(settings.models.models_file,
                                    settings.models.models_dir),
        cache_dir=settings.model_cache, device=settings.generator.device,
        allow_downloads=settings.models.allow_downloads,
        max_loaded=settings.generator.max_loaded_models,
        max_bytes=settings.generator.max_model_bytes,
    )
    ctx["lora_files"] = LoraFiles(settings.model_cache / "loras")
    ctx["lora_cache"] = LoraAdapterCache(ctx["lora_files"],
                                         max_loaded=settings.generator.max_loaded_loras)
    # One pipeline call at a time per worker (one GPU): arq may hand us batch_size jobs at
    # once, but only to group them; loading another model also waits for the slot, so a
    # model is never evicted while it renders.
    ctx["render_slot"] = asyncio.Lock()
    ctx["batcher"] = Batcher(lambda items, on_step: _run_batch(ctx, items, on_step),
                             max_size=settings.generator.batch_size,
                             window_s=settings.generator.batch_window_s,
                             slot=ctx["render_slot"])
    ctx["safety"] = LazySafetyFilter()
    ctx["versions"] = library_versions()
    try:
        await asyncio.to_thread(ctx["cache"].get, settings.generator.default_model)
    except LoomisError as exc:
        logger.warning("default model not preloaded: %s", exc.detail)


async def _put(store: ObjectStore, key: str, data: bytes, content_type: str) -> ArtifactRef:
    await store.put(key, data, content_type=content_type)
    kind = {"image/png": "image"}.get(content_type, "manifest")
    return ArtifactRef(key=key, kind=kind, content_type=content_type,
                       size=len(data), sha256=hashlib.sha256(data).hexdigest())


async def _load_inputs(store: ObjectStore, inputs: dict[str, str]) -> dict[str, Image.Image]:
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
    files: LoraFiles = ctx["lora_files"]
    store: ObjectStore = ctx["store"]
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


def _run_batch(ctx: dict[str, Any], items: list[BatchItem], on_step: Any) -> list[RenderResult]:
    """One pipeline call for a group of compatible jobs; the result is split back per job."""
    jobs: list[_Job] = [item.payload for item in items]
    loaded = jobs[0].loaded
    specs = [j.task.spec for j in jobs]
    prepared = [j.prepared for j in jobs]
    combined = render(loaded, specs, prepared, loras=jobs[0].task.loras,
                      lora_cache=ctx["lora_cache"], on_step=on_step,
                      exact=ctx["settings"].generator.batch_exact)
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


async def _render_task(
    ctx: dict[str, Any], task: GenerationTask, *,
    progress: Callable[[int, int], Awaitable[None]],
) -> Rendered:
    """Load, prepare inputs, render (through the batcher) and filter one spec's images."""
    events: JobEvents = ctx["events"]
    store: ObjectStore = ctx["store"]
    settings: Settings = ctx["settings"]
    spec = task.spec
    loop = asyncio.get_running_loop()

    t0 = time.perf_counter()
    async with ctx["render_slot"]:
        loaded: LoadedModel = await asyncio.to_thread(ctx["cache"].get, spec.model)
    raw = await _load_inputs(store, task.inputs)
    await _fetch_loras(ctx, task.loras)
    try:
        prepared = await asyncio.to_thread(
            prepare_inputs, spec, raw, model_cache=settings.model_cache,
            resolve=ctx["cache"].resolve_source, depth_model=settings.generator.depth_model)
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

    batcher: Batcher = ctx["batcher"]
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
            ctx["safety"].apply, result.images, threshold=task.safety.threshold,
            action=task.safety.action)
        images = [v.image for v in verdicts]
        safety = [{"index": i, "score": round(v.score, 4), "flagged": v.flagged,
                   "action": task.safety.action if v.flagged else None}
                  for i, v in enumerate(verdicts)]
    return Rendered(result=result, loaded=loaded, images=images, safety=safety,
                    model_ready_s=model_ready_s)


def _as_run(spec: GenerationSpec, *, scheduler: str) -> GenerationSpec:
    """The spec with the model's own scheduler filled in where the client left it to the model
    (only the worker knows it), so the recorded spec reproduces the run even if the model's
    default changes; a scheduler that is not one of ours cannot be named in a spec."""
    if spec.scheduler is not None or canonical_scheduler(scheduler) != scheduler:
        return spec
    return spec.model_copy(update={"scheduler": scheduler})


async def _run(ctx: dict[str, Any], task: GenerationTask, *, queued_s: float) -> dict[str, Any]:
    events: JobEvents = ctx["events"]
    store: ObjectStore = ctx["store"]
    spec = task.spec
    timings: dict[str, float] = {"queue_wait_s": round(queued_s, 4)}

    async def progress(step: int, total: int) -> None:
        await events.emit(task.job_id, "progress", allowed_from=RUNNING,
                          data={"step": step, "total_steps": total,
                                "progress": round(step / total, 4)})

    rendered = await _render_task(ctx, task, progress=progress)
    result, loaded, images, safety = (rendered.result, rendered.loaded, rendered.images,
                                      rendered.safety)
    timings["model_ready_s"] = round(rendered.model_ready_s, 4)
    timings["pipeline_s"] = round(result.seconds, 4)
    spec = _as_run(spec, scheduler=result.scheduler)

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
        ref = await _put(store, output_key(task.tenant_id, task.job_id, index), png, "image/png")
        refs.append(ref.model_copy(update={"index": index, "width": image.width,
                                           "height": image.height, "seed": seed}))
    timings["upload_s"] = round(time.perf_counter() - t1, 4)
    manifest = GenerationManifest(
        job_id=task.job_id, tenant_id=task.tenant_id, spec=spec, model=loaded.describe(),
        scheduler=result.scheduler, seeds=result.seeds, images=refs, versions=ctx["versions"],
        device=loaded.device, timings=timings, created_at=datetime.now(UTC),
        pipeline=result.pipeline, inputs=task.inputs, loras=result.loras, safety=safety,
        prompt_encoding=result.prompt_encoding,
        nsfw_content_detected=result.nsfw_content_detected,
    )
    # The manifest goes last: its presence means every image it lists is in place.
    manifest_ref = await _put(store, manifest_key(task.tenant_id, task.job_id),
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
    outcome = GenerationOutcome(artifacts=[*refs, manifest_ref],
                                result=GenerationResult.model_validate(summary))
    if spec.scheduler != task.spec.scheduler:  # onto the job's recorded spec too
        outcome.spec_filled = {"scheduler": spec.scheduler}
    return outcome.event_data()


async def preprocess_control(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """A control image for the gateway's preview endpoint, stored as the tenant's upload."""
    from services.generator.control import PreprocessError

    task = PreprocessTask.model_validate(payload)
    store: ObjectStore = ctx["store"]
    settings: Settings = ctx["settings"]
    spec = task.spec
    try:
        image = None
        if task.input_key is not None:
            image = (await _load_inputs(store, {"image": task.input_key}))["image"]
        result = await asyncio.to_thread(
            control_image, spec.type.value, image, size=(task.width, task.height),
            low=spec.low_threshold, high=spec.high_threshold, keypoints=spec.keypoints,
            model_cache=settings.model_cache, resolve=ctx["cache"].resolve_source,
            depth_model=settings.generator.depth_model)
    except (PreprocessError, JobFailure) as exc:
        return {"error": str(exc), "field": "keypoints" if spec.keypoints else "image"}
    except Exception as exc:  # the gateway is waiting: answer instead of raising into arq
        logger.exception("preprocessing failed")
        return {"error": f"preprocessing failed on the worker: {type(exc).__name__}",
                "field": "type", "code": "preprocess_error"}
    buffer = io.BytesIO()
    result.save(buffer, format="PNG")
    data = buffer.getvalue()
    upload_id = hashlib.sha256(data).hexdigest()[:32]
    key = upload_key(task.tenant_id, upload_id)
    await store.put(key, data, content_type="image/png")
    return {"key": key, "ref": f"upload:{upload_id}"}


async def generate(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """The arq task. Returns a small summary; the real outcome is the job's terminal event."""
    events: JobEvents = ctx["events"]
    task = GenerationTask.model_validate(payload)
    if not task.spec.is_resolved():
        await events.emit(task.job_id, "failed", to=JobStatus.FAILED, data={"error": {
            "code": "invalid_spec", "message": "the queued spec was not resolved"}})
        return {"status": "failed"}
    return await run_job(
        ctx, job_id=task.job_id, cleanup_prefix=job_prefix(task.tenant_id, task.job_id),
        timeout_s=ctx["settings"].generator.job_timeout_s,
        max_tries=ctx["settings"].generator.max_tries,
        log_extra={"job_id": task.job_id, "tenant": task.tenant_id, "model": task.spec.model},
        body=lambda queued_s: _run(ctx, task, queued_s=queued_s), kind=JobKind.GENERATION.value,
    )


async def sweep(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """Render every cell of a sweep, then the contact sheet and the metadata JSON."""
    task = SweepTask.model_validate(payload)
    return await run_job(
        ctx, job_id=task.job_id, cleanup_prefix=job_prefix(task.tenant_id, task.job_id),
        timeout_s=ctx["settings"].generator.job_timeout_s,
        max_tries=ctx["settings"].generator.max_tries,
        log_extra={"job_id": task.job_id, "tenant": task.tenant_id,
                   "model": task.sweep.base.model},
        body=lambda queued_s: _run_sweep(ctx, task, queued_s=queued_s), kind=JobKind.SWEEP.value,
    )


def _label(param: str, value: object, limit: int = 48) -> str:
    """Sheet labels stay short (a prompt axis would make a column thousands of px wide);
    the full values are in sweep.json."""
    text = f"{param}={value}"
    return text if len(text) <= limit else text[:limit - 1] + "…"


async def _run_sweep(ctx: dict[str, Any], task: SweepTask, *, queued_s: float) -> dict[str, Any]:
    from services.generator.sheet import contact_sheet

    store: ObjectStore = ctx["store"]
    events: JobEvents = ctx["events"]
    timings: dict[str, float] = {"queue_wait_s": round(queued_s, 4), "pipeline_s": 0.0}
    cells = task.cells
    images: list[Image.Image | None] = []
    refs: list[ArtifactRef] = []
    cell_meta: list[dict[str, Any]] = []
    safety: list[dict[str, Any]] = []
    loaded: LoadedModel | None = None
    for position, cell in enumerate(cells):
        # Progress spans the whole sweep: cell k of n at step s of t is (k + s/t) / n.
        async def scaled(step: int, total: int, *, _k: int = position) -> None:
            await events.emit(task.job_id, "progress", allowed_from=RUNNING, data={
                "step": step, "total_steps": total, "cell": _k, "cells": len(cells),
                "progress": round((_k + step / total) / len(cells), 4)})

        cell_task = GenerationTask(job_id=task.job_id, tenant_id=task.tenant_id, spec=cell.spec,
                                   inputs=task.inputs, loras=task.loras, safety=task.safety)
        rendered = await _render_task(ctx, cell_task, progress=scaled)
        result, loaded = rendered.result, rendered.loaded
        timings["pipeline_s"] = round(timings["pipeline_s"] + result.seconds, 4)
        image = rendered.images[0]
        images.append(image)
        if rendered.safety:
            safety.append({**rendered.safety[0], "index": cell.index})
        cell_spec = _as_run(cell.spec, scheduler=result.scheduler)
        entry = {"index": cell.index, "row": cell.row, "col": cell.col, "labels": cell.labels,
                 "seed": result.seeds[0], "spec": cell_spec.model_dump(mode="json")}
        if image is not None:
            png = encode_png(image, parameters=a1111_parameters(
                cell_spec, seed=result.seeds[0], scheduler=result.scheduler, model=loaded,
                loras=result.loras), loomis={"job_id": task.job_id, "cell": entry})
            ref = await _put(store, output_key(task.tenant_id, task.job_id, cell.index), png,
                             "image/png")
            refs.append(ref.model_copy(update={"index": cell.index, "width": image.width,
                                               "height": image.height, "seed": result.seeds[0]}))
            entry["key"] = ref.key
        else:
            entry["withheld"] = True
        cell_meta.append(entry)
    assert loaded is not None
    cols = task.sweep.axes[0]
    rows = task.sweep.axes[1] if len(task.sweep.axes) > 1 else None
    n_cols = len(cols.values)
    grid = [images[r * n_cols:(r + 1) * n_cols] for r in range(len(images) // n_cols)]
    sheet = await asyncio.to_thread(
        contact_sheet, grid,
        row_labels=[_label(rows.param, v) for v in rows.values] if rows else [""],
        col_labels=[_label(cols.param, v) for v in cols.values],
        title=task.sweep.title or task.sweep.base.prompt[:120],
        row_axis=rows.param if rows else "", col_axis=cols.param)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    sheet_ref = await _put(store, contact_sheet_key(task.tenant_id, task.job_id),
                           buffer.getvalue(), "image/png")
    sheet_ref = sheet_ref.model_copy(update={"kind": "contact_sheet", "width": sheet.width,
                                             "height": sheet.height})
    metadata = {"job_id": task.job_id, "title": task.sweep.title,
                "axes": [a.model_dump(mode="json") for a in task.sweep.axes],
                "columns": n_cols, "rows": len(rows.values) if rows else 1,
                "model": loaded.describe(), "cells": cell_meta, "safety": safety}
    meta_ref = await _put(store, sweep_metadata_key(task.tenant_id, task.job_id),
                          json.dumps(metadata, indent=2).encode(), "application/json")
    meta_ref = meta_ref.model_copy(update={"kind": "metadata"})
    manifest = {"job_id": task.job_id, "tenant_id": task.tenant_id,
                "sweep": task.sweep.model_dump(mode="json"), "model": loaded.describe(),
                "versions": ctx["versions"], "device": loaded.device, "timings": timings,
                "artifacts": [r.model_dump() for r in [*refs, sheet_ref, meta_ref]],
                "created_at": datetime.now(UTC).isoformat()}
    manifest_ref = await _put(store, manifest_key(task.tenant_id, task.job_id),
                              json.dumps(manifest, indent=2).encode(), "application/json")
    return SweepOutcome(artifacts=[*refs, sheet_ref, meta_ref, manifest_ref],
                        result=SweepResult.model_validate({
                            "timings": timings, "cells": len(cells), "columns": n_cols,
                            "rows": len(rows.values) if rows else 1,
                            "model": {"name": loaded.preset.name, "sha256": loaded.sha256},
                            **({"safety": safety} if safety else {})})).event_data()


def build_worker(settings: Settings | None = None) -> Worker:
    settings = settings or get_settings()
    cfg = settings.generator
    return make_worker(
        settings,
        functions=[func(generate, name=GENERATE_TASK),
                   func(sweep, name=SWEEP_TASK),
                   func(preprocess_control, name=PREPROCESS_TASK, max_tries=1)],
        queue=GENERATOR_QUEUE, startup=startup, job_timeout_s=cfg.job_timeout_s,
        max_tries=cfg.max_tries, poll_delay_s=cfg.poll_delay_s,
        # One pipeline per GPU: jobs beyond one only wait in the batcher for compatible
        # company, and run together as one pipeline call.
        max_jobs=cfg.batch_size,
    )


def main() -> None:
    run_worker(build_worker)


if __name__ == "__main__":
    main()

"""The generator worker: an arq process that owns one GPU (or the CPU) and runs generations.

Delivery is at-least-once, so a job may run twice (its worker died): every write goes to
keys derived from the job id, and state transitions go through :class:`JobEvents`, which
refuses to leave a terminal state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from arq.worker import Worker, func

from services.generator.batching import Batcher
from services.generator.context import GeneratorContext, LazySafetyFilter
from services.generator.control import PreprocessError
from services.generator.evictions import LoraEvictor
from services.generator.generation import load_inputs, run_batch, run_generation
from services.generator.loras import LoraAdapterCache, LoraFiles
from services.generator.pipelines import PipelineCache
from services.generator.render import control_image
from services.generator.sweeps import run_sweep
from services.jobrunner import common_startup, make_worker, run_job, run_worker
from services.workerctx import CONTEXT_KEY
from shared.errors import JobFailure, LoomisError
from shared.keys import job_prefix, upload_key
from shared.models import ModelRegistry
from shared.queue import (
    GENERATE_TASK,
    GENERATOR_QUEUE,
    MATCH_ACTIONS_TASK,
    PREPROCESS_TASK,
    SCENE_TASK,
    SWEEP_TASK,
)
from shared.settings import Settings, get_settings
from shared.specs import GenerationTask, JobKind, JobStatus, PreprocessTask, SweepTask
from shared.specs.scene import SceneAction, SceneTask

logger = logging.getLogger(__name__)

_FOLLOWER_KEY = "lora_evictions_follower"


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
    base = common_startup(ctx)
    base.versions = library_versions()
    settings = base.settings
    lora_files = LoraFiles(settings.model_cache / "loras")
    lora_cache = LoraAdapterCache(lora_files, max_loaded=settings.generator.max_loaded_loras)
    render_slot = asyncio.Lock()
    cache = PipelineCache(
        registry=ModelRegistry.load(settings.models.models_file, settings.models.models_dir),
        cache_dir=settings.model_cache, device=settings.generator.device,
        allow_downloads=settings.models.allow_downloads,
        max_loaded=settings.generator.max_loaded_models,
        max_bytes=settings.generator.max_model_bytes,
    )
    evictor = LoraEvictor(redis=ctx["redis"], files=lora_files, adapters=lora_cache,
                          models=cache, render_slot=render_slot)
    context = GeneratorContext.extend(
        base,
        cache=cache,
        lora_files=lora_files,
        lora_cache=lora_cache,
        lora_evictor=evictor,
        render_slot=render_slot,
        batcher=Batcher(lambda items, on_step: run_batch(ctx, items, on_step),
                        max_size=settings.generator.batch_size,
                        window_s=settings.generator.batch_window_s,
                        slot=render_slot),
        safety=LazySafetyFilter(),
    )
    ctx[CONTEXT_KEY] = context
    # LoRAs deleted while this worker was down leave its cache before it takes a job.
    await evictor.catch_up()
    ctx[_FOLLOWER_KEY] = asyncio.create_task(evictor.follow())
    try:
        await asyncio.to_thread(context.cache.get, settings.generator.default_model)
    except LoomisError as exc:
        logger.warning("default model not preloaded: %s", exc.detail)


async def shutdown(ctx: dict[str, Any]) -> None:
    follower = ctx.pop(_FOLLOWER_KEY, None)
    if follower is not None:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower


async def preprocess_control(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """A control image for the gateway's preview endpoint, stored as the tenant's upload."""

    task = PreprocessTask.model_validate(payload)
    store = GeneratorContext.of(ctx).store
    settings = GeneratorContext.of(ctx).settings
    spec = task.spec
    try:
        image = None
        if task.input_key is not None:
            image = (await load_inputs(store, {"image": task.input_key}))["image"]
        result = await asyncio.to_thread(
            control_image, spec.type.value, image, size=(task.width, task.height),
            low=spec.low_threshold, high=spec.high_threshold, keypoints=spec.keypoints,
            model_cache=settings.model_cache, resolve=GeneratorContext.of(ctx).cache.resolve_source,
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
    events = GeneratorContext.of(ctx).events
    task = GenerationTask.model_validate(payload)
    if not task.spec.is_resolved():
        await events.emit(task.job_id, "failed", to=JobStatus.FAILED, data={"error": {
            "code": "invalid_spec", "message": "the queued spec was not resolved"}})
        return {"status": "failed"}
    return await run_job(
        ctx, job_id=task.job_id, cleanup_prefix=job_prefix(task.tenant_id, task.job_id),
        timeout_s=GeneratorContext.of(ctx).settings.generator.job_timeout_s,
        max_tries=GeneratorContext.of(ctx).settings.generator.max_tries,
        log_extra={"job_id": task.job_id, "tenant": task.tenant_id, "model": task.spec.model},
        body=lambda queued_s: run_generation(ctx, task, queued_s=queued_s), kind=JobKind.GENERATION.value,
    )


async def sweep(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """Render every cell of a sweep, then the contact sheet and the metadata JSON."""
    task = SweepTask.model_validate(payload)
    return await run_job(
        ctx, job_id=task.job_id, cleanup_prefix=job_prefix(task.tenant_id, task.job_id),
        timeout_s=GeneratorContext.of(ctx).settings.generator.job_timeout_s,
        max_tries=GeneratorContext.of(ctx).settings.generator.max_tries,
        log_extra={"job_id": task.job_id, "tenant": task.tenant_id,
                   "model": task.sweep.base.model},
        body=lambda queued_s: run_sweep(ctx, task, queued_s=queued_s), kind=JobKind.SWEEP.value,
    )


async def scene(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """Both stages of a scene; the outcome is the job's terminal event."""
    from services.generator.scenes.job import run_scene

    task = SceneTask.model_validate(payload)
    return await run_job(
        ctx, job_id=task.job_id, cleanup_prefix=job_prefix(task.tenant_id, task.job_id),
        timeout_s=GeneratorContext.of(ctx).settings.generator.job_timeout_s,
        max_tries=GeneratorContext.of(ctx).settings.generator.max_tries,
        log_extra={"job_id": task.job_id, "tenant": task.tenant_id, "model": task.model},
        body=lambda queued_s: run_scene(ctx, task, queued_s=queued_s), kind=JobKind.SCENE.value,
    )


async def match_actions(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """``POST /v1/actions/match``'s ranking, answered to the waiting gateway (not a job)."""
    from services.generator.scenes.job import score_actions

    actions = [SceneAction.model_validate(a) for a in payload["actions"]]
    scores, fresh = await score_actions(payload["text"], actions)
    return {"scores": [s.model_dump() for s in scores], "embeddings": fresh}


def build_worker(settings: Settings | None = None) -> Worker:
    settings = settings or get_settings()
    cfg = settings.generator
    return make_worker(
        settings,
        functions=[func(generate, name=GENERATE_TASK),
                   func(sweep, name=SWEEP_TASK),
                   func(scene, name=SCENE_TASK),
                   func(match_actions, name=MATCH_ACTIONS_TASK, max_tries=1),
                   func(preprocess_control, name=PREPROCESS_TASK, max_tries=1)],
        queue=GENERATOR_QUEUE, startup=startup, shutdown=shutdown, job_timeout_s=cfg.job_timeout_s,
        max_tries=cfg.max_tries, poll_delay_s=cfg.poll_delay_s,
        # One pipeline per GPU: jobs beyond one only wait in the batcher for compatible
        # company, and run together as one pipeline call.
        max_jobs=cfg.batch_size,
    )


def main() -> None:
    run_worker(build_worker)


if __name__ == "__main__":
    main()

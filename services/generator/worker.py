"""The generator worker: an arq process that owns one GPU (or the CPU) and runs generations.

Delivery is at-least-once, so a job may run twice (its worker died): every write goes to
keys derived from the job id, and state transitions go through :class:`JobEvents`, which
refuses to leave a terminal state.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import platform
import socket
import threading
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from arq import Retry
from arq.connections import RedisSettings as ArqRedisSettings
from arq.worker import Worker, func

from services.generator.pipelines import LoadedModel, PipelineCache
from services.generator.render import a1111_parameters, encode_png, render
from shared.errors import JobCanceled, LoomisError, StorageUnavailable
from shared.events import JobEvents
from shared.logs import configure_logging
from shared.models import ModelRegistry
from shared.queue import GENERATE_TASK, GENERATOR_QUEUE
from shared.settings import Settings, get_settings
from shared.specs import ArtifactRef, GenerationManifest, GenerationTask, JobStatus
from shared.storage import ObjectStore, build_store, job_prefix, manifest_key, output_key

logger = logging.getLogger(__name__)

RUNNING = (JobStatus.RUNNING,)


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
    settings: Settings = ctx.get("settings") or get_settings()
    ctx["settings"] = settings
    ctx["events"] = JobEvents(ctx["redis"], stream=settings.redis.events_stream,
                              maxlen=settings.redis.events_maxlen,
                              ttl_s=settings.redis.job_ttl_s)
    store = build_store(settings)
    ctx["store"] = store
    ctx["cache"] = PipelineCache(
        registry=ModelRegistry.load(settings.generator.models_file),
        cache_dir=settings.model_cache, device=settings.generator.device,
        allow_downloads=settings.generator.allow_downloads,
        max_loaded=settings.generator.max_loaded_models,
    )
    ctx["versions"] = library_versions()
    ctx["worker_name"] = socket.gethostname()
    try:
        await asyncio.to_thread(ctx["cache"].get, settings.generator.default_model)
    except LoomisError as exc:
        logger.warning("default model not preloaded: %s", exc.detail)


async def _put(store: ObjectStore, key: str, data: bytes, content_type: str) -> ArtifactRef:
    await store.put(key, data, content_type=content_type)
    return ArtifactRef(key=key, kind="image" if content_type == "image/png" else "manifest",
                       content_type=content_type, size=len(data),
                       sha256=hashlib.sha256(data).hexdigest())


async def _run(ctx: dict[str, Any], task: GenerationTask, *, queued_s: float) -> dict[str, Any]:
    events: JobEvents = ctx["events"]
    store: ObjectStore = ctx["store"]
    spec = task.spec
    loop = asyncio.get_running_loop()
    timings: dict[str, float] = {"queue_wait_s": round(queued_s, 4)}

    t0 = time.perf_counter()
    loaded: LoadedModel = await asyncio.to_thread(ctx["cache"].get, spec.model)
    timings["model_ready_s"] = round(time.perf_counter() - t0, 4)

    async def step_hook(step: int, total: int) -> None:
        if await events.cancel_requested(task.job_id):
            raise JobCanceled()
        await events.emit(task.job_id, "progress", allowed_from=RUNNING,
                          data={"step": step, "total_steps": total,
                                "progress": round(step / total, 4)})

    abandoned = threading.Event()

    def on_step(step: int, total: int) -> None:
        if abandoned.is_set():  # the job timed out: stop burning the GPU on it
            raise JobCanceled()
        asyncio.run_coroutine_threadsafe(step_hook(step, total), loop).result()

    try:
        result = await asyncio.to_thread(render, loaded, spec, on_step=on_step)
    finally:
        abandoned.set()
    timings["pipeline_s"] = round(result.seconds, 4)

    t1 = time.perf_counter()
    refs: list[ArtifactRef] = []
    for index, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
        png = encode_png(
            image,
            parameters=a1111_parameters(spec, seed=seed, scheduler=result.scheduler, model=loaded),
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
    )
    # The manifest goes last: its presence means every image it lists is in place.
    manifest_ref = await _put(store, manifest_key(task.tenant_id, task.job_id),
                              manifest.model_dump_json(indent=2).encode(), "application/json")
    return {
        "artifacts": [r.model_dump() for r in [*refs, manifest_ref]],
        "result": {"timings": timings, "seeds": result.seeds, "scheduler": result.scheduler,
                   "model": {"name": loaded.preset.name, "sha256": loaded.sha256},
                   "device": loaded.device},
    }


async def generate(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """The arq task. Returns a small summary; the real outcome is the job's terminal event."""
    settings: Settings = ctx["settings"]
    events: JobEvents = ctx["events"]
    task = GenerationTask.model_validate(payload)
    job_id = task.job_id
    attempt = int(ctx.get("job_try", 1))
    log_extra = {"job_id": job_id, "tenant": task.tenant_id, "model": task.spec.model}
    if not task.spec.is_resolved():
        await events.emit(job_id, "failed", to=JobStatus.FAILED, data={"error": {
            "code": "invalid_spec", "message": "the queued spec was not resolved"}})
        return {"status": "failed"}
    if attempt > settings.generator.max_tries:
        await events.emit(job_id, "failed", to=JobStatus.FAILED, data={"error": {
            "code": "worker_lost",
            "message": f"the job's worker stopped {attempt - 1} times; giving up"}})
        return {"status": "failed"}

    started = await events.emit(job_id, "running", to=JobStatus.RUNNING,
                                data={"attempt": attempt, "worker": ctx["worker_name"]})
    if started.event is None:
        logger.info("skipping job in state %s", started.previous, extra=log_extra)
        return {"status": started.previous or "unknown"}
    enqueued_ms = ctx.get("enqueue_time")
    queued_s = (time.time() - enqueued_ms.timestamp()) if isinstance(enqueued_ms, datetime) else 0.0
    store: ObjectStore = ctx["store"]
    try:
        if await events.cancel_requested(job_id):
            raise JobCanceled()
        async with asyncio.timeout(settings.generator.job_timeout_s):
            outcome = await _run(ctx, task, queued_s=queued_s)
    except TimeoutError:
        await store.delete_prefix(job_prefix(task.tenant_id, job_id))
        await events.emit(job_id, "failed", allowed_from=RUNNING, to=JobStatus.FAILED,
                          data={"error": {"code": "timeout", "message": "the job took longer "
                                          f"than {settings.generator.job_timeout_s}s"}})
        return {"status": "failed"}
    except JobCanceled:
        await store.delete_prefix(job_prefix(task.tenant_id, job_id))
        await events.emit(job_id, "canceled", allowed_from=RUNNING, to=JobStatus.CANCELED,
                          data={"reason": "canceled by client"})
        logger.info("job canceled", extra=log_extra)
        return {"status": "canceled"}
    except StorageUnavailable as exc:
        if attempt < settings.generator.max_tries:
            logger.warning("storage unavailable, retrying: %s", exc.detail, extra=log_extra)
            raise Retry(defer=2 * attempt) from exc
        await events.emit(job_id, "failed", allowed_from=RUNNING, to=JobStatus.FAILED,
                          data={"error": {"code": exc.code, "message": exc.detail}})
        return {"status": "failed"}
    except LoomisError as exc:
        logger.warning("job failed: %s", exc.detail, extra=log_extra)
        await events.emit(job_id, "failed", allowed_from=RUNNING, to=JobStatus.FAILED,
                          data={"error": {"code": exc.code, "message": exc.detail}})
        return {"status": "failed"}
    except Exception:
        logger.exception("job crashed", extra=log_extra)
        await events.emit(job_id, "failed", allowed_from=RUNNING, to=JobStatus.FAILED,
                          data={"error": {"code": "internal_error",
                                          "message": "generation failed unexpectedly; "
                                          "the worker log has details"}})
        return {"status": "failed"}
    await events.emit(job_id, "succeeded", allowed_from=RUNNING, to=JobStatus.SUCCEEDED,
                      data=outcome)
    logger.info("job succeeded in %.2fs", outcome["result"]["timings"]["pipeline_s"],
                extra=log_extra)
    return {"status": "succeeded"}


def build_worker(settings: Settings | None = None) -> Worker:
    settings = settings or get_settings()
    cfg = settings.generator
    return Worker(
        functions=[func(generate, name=GENERATE_TASK)],
        queue_name=GENERATOR_QUEUE,
        redis_settings=ArqRedisSettings.from_dsn(settings.redis.url),
        on_startup=startup,
        ctx={"settings": settings},
        max_jobs=1,  # one pipeline per GPU: jobs run one after another
        # Our own timeout (cfg.job_timeout_s) fails the job cleanly; arq's is a backstop, and
        # sets the lease after which a dead worker's job is re-delivered (timeout + 10 s).
        job_timeout=cfg.job_timeout_s + 5,
        # On SIGTERM (deploys, scale-down) finish the running job before exiting.
        job_completion_wait=cfg.job_timeout_s,
        # Our own limit (cfg.max_tries) ends the job in `failed`; arq's must be higher so
        # that the last try still reaches our code instead of being dropped silently.
        max_tries=cfg.max_tries + 1,
        poll_delay=cfg.poll_delay_s,
        keep_result=3600,
        handle_signals=True,
    )


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    build_worker(settings).run()


if __name__ == "__main__":
    main()

"""The lifecycle every worker task shares: running, then exactly one terminal state.

Delivery is at-least-once, so a job may start twice (its worker died): the ``running``
transition goes through :class:`JobEvents`, which refuses to leave a terminal state, and a
task that finds its job finished does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from arq import Retry
from arq.typing import StartupShutdown
from arq.worker import Worker
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.arqworker import LeasedWorker, resilient_redis_settings
from services.workerctx import CONTEXT_KEY, WorkerContext, common_context, worker_context
from shared.errors import JobCanceled, JobFailure, LoomisError, StorageUnavailable
from shared.logs import configure_logging, job_context
from shared.settings import Settings, get_settings
from shared.specs import JobStatus

logger = logging.getLogger(__name__)

RUNNING = (JobStatus.RUNNING,)


def unexpected_failure(exc: BaseException, *, kind: str) -> JobFailure:
    """An error not of ours that reached a job's boundary, as one of ours.

    Where its type says what went wrong (memory, a missing package) the client gets a code it
    can act on; otherwise ``internal_error``. The message names the job kind (``training``,
    ``tagging``, ...) and the type, never the text, which may hold paths or data.
    """
    name = type(exc).__name__
    if isinstance(exc, MemoryError) or name == "OutOfMemoryError":  # torch's has no common base
        return JobFailure(f"{kind} ran out of memory on the worker ({name}); use smaller "
                          "sizes or batches", code="out_of_memory")
    if isinstance(exc, ImportError):
        return JobFailure(f"{kind} failed: the worker lacks a package it needs ({name}: "
                          f"{exc.name or 'unknown module'})", code="dependency_unavailable")
    return JobFailure(f"{kind} failed unexpectedly ({name}); the worker log has details",
                      code="internal_error")


async def run_job(
    ctx: dict[str, Any], *, job_id: str, cleanup_prefix: str, timeout_s: float, max_tries: int,
    log_extra: dict[str, Any], body: Callable[[float], Awaitable[dict[str, Any]]],
    kind: str = "job",
) -> dict[str, Any]:
    """:func:`_run_job` with the job bound to every log line written while it runs."""
    with job_context(**{**log_extra, "job_id": job_id, "kind": kind}):
        return await _run_job(ctx, job_id=job_id, cleanup_prefix=cleanup_prefix,
                              timeout_s=timeout_s, max_tries=max_tries, log_extra=log_extra,
                              body=body, kind=kind)


async def _run_job(
    ctx: dict[str, Any], *, job_id: str, cleanup_prefix: str, timeout_s: float, max_tries: int,
    log_extra: dict[str, Any], body: Callable[[float], Awaitable[dict[str, Any]]],
    kind: str,
) -> dict[str, Any]:
    """Running -> succeeded | failed | canceled around ``body``, whatever it raises.

    Shared by every worker task (generator, tagger) so each ends the same way: a timeout or cancel deletes
    what the job wrote, storage errors retry, anything else fails with a code, never a
    traceback, and a job is never left ``running``.
    """
    context = worker_context(ctx)
    events = context.events
    attempt = int(ctx.get("job_try", 1))
    if attempt > max_tries:
        await events.emit(job_id, "failed", to=JobStatus.FAILED, data={"error": {
            "code": "worker_lost",
            "message": f"the job's worker stopped {attempt - 1} times; giving up"}})
        return {"status": "failed"}

    started = await events.emit(job_id, "running", to=JobStatus.RUNNING,
                                data={"attempt": attempt, "worker": context.worker_name})
    if started.event is None:
        logger.info("skipping job in state %s", started.previous, extra=log_extra)
        return {"status": started.previous or "unknown"}
    enqueued_ms = ctx.get("enqueue_time")
    queued_s = (time.time() - enqueued_ms.timestamp()) if isinstance(enqueued_ms, datetime) else 0.0
    store = context.store
    try:
        if await events.cancel_requested(job_id):
            raise JobCanceled()
        async with asyncio.timeout(timeout_s):
            outcome = await body(queued_s)
    except TimeoutError:
        await store.delete_prefix(cleanup_prefix)
        await events.emit(job_id, "failed", allowed_from=RUNNING, to=JobStatus.FAILED,
                          data={"error": {"code": "timeout", "message": "the job took longer "
                                          f"than {timeout_s}s"}})
        return {"status": "failed"}
    except JobCanceled:
        await store.delete_prefix(cleanup_prefix)
        await events.emit(job_id, "canceled", allowed_from=RUNNING, to=JobStatus.CANCELED,
                          data={"reason": "canceled by client"})
        logger.info("job canceled", extra=log_extra)
        return {"status": "canceled"}
    except StorageUnavailable as exc:
        if attempt < max_tries:
            logger.warning("storage unavailable, retrying: %s", exc.detail, extra=log_extra)
            raise Retry(defer=2 * attempt) from exc
        await events.emit(job_id, "failed", allowed_from=RUNNING, to=JobStatus.FAILED,
                          data={"error": {"code": exc.code, "message": exc.detail}})
        return {"status": "failed"}
    except (RedisConnectionError, RedisTimeoutError) as exc:
        # Redis stayed away longer than the client's own retries: the job is not at fault and
        # no failure could be recorded anyway, so arq re-runs it (resuming where it can) once
        # Redis is back; the attempt cap above still ends a job that keeps hitting outages.
        logger.warning("redis unavailable, the job will be retried: %s", exc, extra=log_extra)
        raise Retry(defer=5 * attempt) from exc
    except LoomisError as exc:
        logger.warning("job failed: %s", exc.detail, extra=log_extra)
        await store.delete_prefix(cleanup_prefix)
        await events.emit(job_id, "failed", allowed_from=RUNNING, to=JobStatus.FAILED,
                          data={"error": {"code": exc.code, "message": exc.detail}})
        return {"status": "failed"}
    except Exception as exc:
        logger.exception("job crashed", extra=log_extra)
        failure = unexpected_failure(exc, kind=kind)
        await store.delete_prefix(cleanup_prefix)
        await events.emit(job_id, "failed", allowed_from=RUNNING, to=JobStatus.FAILED,
                          data={"error": {"code": failure.code, "message": failure.detail}})
        return {"status": "failed"}
    await events.emit(job_id, "succeeded", allowed_from=RUNNING, to=JobStatus.SUCCEEDED,
                      data=outcome)
    logger.info("job succeeded", extra=log_extra)
    return {"status": "succeeded"}


def common_startup(ctx: dict[str, Any]) -> WorkerContext:
    """The clients every worker shares, built once in arq's startup hook and kept in ``ctx``
    (a worker with fields of its own stores its subclass over it)."""
    context = common_context(ctx)
    ctx[CONTEXT_KEY] = context
    return context


def make_worker(
    settings: Settings, *, functions: list[Any], queue: str,
    startup: StartupShutdown, job_timeout_s: int, max_tries: int,
    poll_delay_s: float, max_jobs: int = 1, completion_wait_s: int | None = None,
    shutdown: StartupShutdown | None = None,
) -> Worker:
    """An arq worker with the settings every Loomis worker needs to agree on."""
    return LeasedWorker(
        functions=functions,
        queue_name=queue,
        redis_settings=resilient_redis_settings(settings.redis.url,
                                                retry_s=settings.worker.redis_retry_s),
        on_startup=startup,
        on_shutdown=shutdown,
        ctx={"settings": settings},
        max_jobs=max_jobs,
        # A dead worker's job is re-delivered one lease after its last renewal, not after
        # arq's job timeout + 10 s.
        lease_s=settings.worker.lease_s,
        lease_renew_s=settings.worker.lease_renew_s,
        # Our own timeout (run_job) fails the job cleanly; arq's is a backstop.
        job_timeout=job_timeout_s + 5,
        # On SIGTERM (deploys, scale-down) finish the running job before exiting.
        job_completion_wait=job_timeout_s if completion_wait_s is None else completion_wait_s,
        # Our own limit ends the job in `failed`; arq's must be higher so that the last try
        # still reaches our code instead of being dropped silently.
        max_tries=max_tries + 1,
        poll_delay=poll_delay_s,
        keep_result=3600,
        handle_signals=True,
    )


def run_worker(build: Callable[[Settings], Worker]) -> None:
    """The ``python -m services.<worker>`` entry point."""
    settings = get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    build(settings).run()

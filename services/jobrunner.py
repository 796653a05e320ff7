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

from shared.errors import JobCanceled, LoomisError, StorageUnavailable
from shared.events import JobEvents
from shared.specs import JobStatus
from shared.storage import ObjectStore

logger = logging.getLogger(__name__)

RUNNING = (JobStatus.RUNNING,)


async def run_job(
    ctx: dict[str, Any], *, job_id: str, cleanup_prefix: str, timeout_s: float, max_tries: int,
    log_extra: dict[str, Any], body: Callable[[float], Awaitable[dict[str, Any]]],
) -> dict[str, Any]:
    """Running -> succeeded | failed | canceled around ``body``, whatever it raises.

    Shared by every worker task (generator, tagger) so each ends the same way: a timeout or cancel deletes
    what the job wrote, storage errors retry, anything else fails with a code, never a
    traceback, and a job is never left ``running``.
    """
    events: JobEvents = ctx["events"]
    attempt = int(ctx.get("job_try", 1))
    if attempt > max_tries:
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
    except LoomisError as exc:
        logger.warning("job failed: %s", exc.detail, extra=log_extra)
        await store.delete_prefix(cleanup_prefix)
        await events.emit(job_id, "failed", allowed_from=RUNNING, to=JobStatus.FAILED,
                          data={"error": {"code": exc.code, "message": exc.detail}})
        return {"status": "failed"}
    except Exception:
        logger.exception("job crashed", extra=log_extra)
        await store.delete_prefix(cleanup_prefix)
        await events.emit(job_id, "failed", allowed_from=RUNNING, to=JobStatus.FAILED,
                          data={"error": {"code": "internal_error",
                                          "message": "generation failed unexpectedly; "
                                          "the worker log has details"}})
        return {"status": "failed"}
    await events.emit(job_id, "succeeded", allowed_from=RUNNING, to=JobStatus.SUCCEEDED,
                      data=outcome)
    logger.info("job succeeded", extra=log_extra)
    return {"status": "succeeded"}

"""Job submission for every kind: hash the request, replay an idempotent retry, record the
job, then enqueue it.

The order is the point: the task is written to Redis *beside* the queue first (the job's
pending entry), the row is committed next, and only then is the task queued. A worker never runs
a job the database does not know; a queue that cannot take the task ends the job in ``failed``
at once; and a gateway killed between the commit and the enqueue leaves the pending entry from
which :mod:`services.gateway.jobs.recovery` queues the job later, instead of it staying
``queued`` for ever. Each domain (generations, sweeps, taggings, trainings) validates its own
request and hands the result here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from pydantic import BaseModel
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from services.gateway.db.models import Job, Tenant, new_id, utcnow
from services.gateway.deps import GatewayState
from services.gateway.webhooks.service import CheckedWebhook
from shared.errors import Conflict, ServiceUnavailable
from shared.events import PENDING_JOBS, pending_key, state_key
from shared.queue import GENERATOR_QUEUE
from shared.specs import JobKind, JobStatus, LoraRef, WebhookTarget

logger = logging.getLogger(__name__)


# arq's enqueue_job as one atomic script: it WATCHes the job key, checks the job and result keys
# and then runs MULTI/EXEC, three round trips that were a sixth of a submission's CPU. The
# same keys, the same serialised job (arq's own serialize_job) and the same no-op for an id
# already queued or finished; tests/test_hot_path.py holds it to what enqueue_job writes.
# It also drops the job's pending entry (KEYS[4]) and its id from the pending index (KEYS[5]):
# once queued, nothing is left to recover.
_ENQUEUE = """
redis.call('del', KEYS[4])
redis.call('zrem', KEYS[5], ARGV[4])
if redis.call('exists', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('psetex', KEYS[1], ARGV[1], ARGV[2])
redis.call('zadd', KEYS[3], ARGV[3], ARGV[4])
return 1
"""


async def drop_pending(redis: Any, job_ids: Sequence[str], *, live_state: bool = False) -> None:
    """Forget held tasks (and, with ``live_state``, the jobs' live state): their rows were
    refused, ended without them, or are being forgotten."""
    if not job_ids:
        return
    keys = [pending_key(i) for i in job_ids] + ([state_key(i) for i in job_ids]
                                                if live_state else [])
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(*keys)
        pipe.zrem(PENDING_JOBS, *job_ids)
        await pipe.execute()


def serialize_task(redis: Any, *, task: str, payload: dict[str, Any]) -> tuple[bytes, int]:
    """The task as arq stores it, and its enqueue time (the queue's score)."""
    now = timestamp_ms()
    return serialize_job(task, (payload,), {}, None, now, serializer=redis.job_serializer), now


async def enqueue_serialized(redis: Any, *, queue: str, job_id: str, job: bytes,
                             score: int) -> bool:
    # EVAL, not EVALSHA: Redis keeps the compiled script by its hash either way
    added = await redis.eval(_ENQUEUE, 5, job_key_prefix + job_id, result_key_prefix + job_id,
                             queue, pending_key(job_id), PENDING_JOBS, redis.expires_extra_ms,
                             job, score,
                             job_id)
    return bool(added)


async def enqueue(redis: Any, *, queue: str, task: str, job_id: str, payload: dict[str, Any]) -> bool:
    """Enqueue under the job's own id so a repeated enqueue of the same job is a no-op
    (False)."""
    job, now = serialize_task(redis, task=task, payload=payload)
    return await enqueue_serialized(redis, queue=queue, job_id=job_id, job=job, score=now)


def request_hash(spec: BaseModel) -> str:
    """Hash of what the client sent (not of server-filled fields such as a drawn seed).

    A spec's ``webhook`` is left out of every dump (it must not reach a worker), so it is added
    here: the same body with another webhook is another request."""
    sent = spec.model_dump(mode="json", exclude_unset=True)
    webhook = getattr(spec, "webhook", None)
    if isinstance(webhook, WebhookTarget):
        sent["webhook"] = webhook.model_dump(mode="json", exclude_unset=True)
    return hashlib.sha256(json.dumps(sent, sort_keys=True).encode()).hexdigest()


async def find_replay(
    *, session: AsyncSession, tenant: Tenant, key: str, digest: str
) -> Job | None:
    job = await session.scalar(
        select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == key)
    )
    if job is not None and job.request_hash != digest:
        raise Conflict(
            "this Idempotency-Key was used with a different request body",
            code="idempotency_key_reused",
        )
    return job


async def create_and_enqueue(
    *, session: AsyncSession, state: GatewayState, tenant: Tenant, kind: JobKind,
    spec: dict[str, Any], digest: str, idempotency_key: str | None, task_name: str,
    payload: Callable[[str], dict[str, Any]], queue: str = GENERATOR_QUEUE,
    webhook: CheckedWebhook | None = None, loras: Sequence[LoraRef] = (),
) -> tuple[Job, bool]:
    """Hold the task in Redis, commit the job row, then enqueue it; a queue failure ends the
    job in ``failed`` (or, before the row exists, refuses the request with a 503).

    ``webhook`` (the spec's, as ``check_job_webhook`` passed it) goes on the row, beside the
    spec the worker gets, never into it. ``loras`` (those the job will apply) are recorded as
    its lineage in the same transaction: forgetting a LoRA or a subject finds the job."""
    if session.new or session.dirty or session.deleted:
        raise RuntimeError("a submission commits its job row alone; commit other changes first")
    now = utcnow()
    job_id = new_id()
    task, score = serialize_task(state.redis, task=task_name, payload=payload(job_id))
    try:
        # The live state and the pending task in one round trip, before the row: a gateway
        # killed after the commit leaves what recovery needs to queue the job.
        async with state.redis.pipeline(transaction=True) as pipe:
            state.events.create_into(pipe, job_id, tenant_id=tenant.id)
            pipe.hset(pending_key(job_id), mapping={"queue": queue, "job": task,
                                                    "score": score})
            pipe.expire(pending_key(job_id), state.settings.redis.job_ttl_s)
            pipe.zadd(PENDING_JOBS, {job_id: score})
            await pipe.execute()
    except Exception as exc:
        logger.exception("the job could not be held for queueing", extra={"job_id": job_id})
        raise ServiceUnavailable("the job queue is unavailable; try again",
                                 code="queue_unavailable") from exc
    row: dict[str, Any] = {
        "id": job_id, "tenant_id": tenant.id, "kind": kind.value,
        "status": JobStatus.QUEUED.value, "spec": spec, "idempotency_key": idempotency_key,
        "request_hash": digest, "result": {}, "progress": 0.0, "last_seq": 0, "attempts": 0,
        "cancel_requested": False, "error_code": None, "error_message": None,
        "created_at": now, "started_at": None, "finished_at": None, "updated_at": now,
        "webhook": webhook,
    }
    try:
        await state.job_inserts.insert(row, [
            {"job_id": row["id"], "lora_id": lora.id, "tenant_id": tenant.id,
             "subject_id": lora.subject_id, "sha256": lora.sha256}
            for lora in {lora.id: lora for lora in loras}.values()])
    except IntegrityError:
        # A concurrent request with the same key won the race: answer as its replay.
        with contextlib.suppress(Exception):
            await drop_pending(state.redis, [job_id], live_state=True)
        if idempotency_key and (
            existing := await find_replay(session=session, tenant=tenant, key=idempotency_key,
                                          digest=digest)
        ):
            return existing, False
        raise
    except Exception:
        # No row (or one whose commit the client is told failed: recovery then finds no task
        # and fails it): the task must not sit in Redis for job_ttl_s. A cancelled submission
        # (BaseException) keeps it, as the batch it joined may still commit its row.
        with contextlib.suppress(Exception):
            await drop_pending(state.redis, [job_id], live_state=True)
        raise
    job = Job(**row)  # what was committed, for the response; the session never saw it
    set_committed_value(job, "artifacts", [])
    try:
        await state.events.emit(job.id, "queued", allowed_from=(JobStatus.QUEUED,),
                                data={"queue": queue})
        await enqueue_serialized(state.redis, queue=queue, job_id=job.id, job=task, score=score)
    except Exception as exc:
        logger.exception("enqueue failed", extra={"job_id": job.id})
        with contextlib.suppress(Exception):  # the job ends failed: nothing to recover
            await drop_pending(state.redis, [job.id])
        async with state.write_lock:
            await session.execute(update(Job).where(Job.id == job.id).values(
                status=JobStatus.FAILED.value, error_code="queue_unavailable",
                error_message="the job could not be queued; submit it again",
                finished_at=utcnow(), updated_at=utcnow()))
            await session.commit()
        raise ServiceUnavailable("the job queue is unavailable; try again",
                                 code="queue_unavailable") from exc
    # The queued event is recorded by the event consumer, with the rest of the stream, in its
    # batched transactions: the row already says ``queued``, so a client reading the job at
    # once sees what the event would have written, and a second write transaction per
    # submission (half its cost on SQLite) is saved. A follower of the job's events reads it
    # from the job's stream until then.
    return job, True

"""Jobs that are ``queued`` in the database but not in the queue.

A submission holds its task in Redis (the job's pending entry), commits the row and then
queues the task; a gateway killed between the commit and the enqueue leaves a row that no
worker will ever see. Every gateway looks for such rows at start-up and every
``queue_recovery_interval_s``: a job whose task is still pending is queued from it (the enqueue
is a no-op for a job already queued or done, so two gateways doing this is harmless); one whose
task is gone too (Redis restarted empty) fails with ``not_queued``, through the live state, so
its client, its webhook and a subject waiting on it all hear of it instead of waiting for ever.
Held tasks are indexed by submission time (``PENDING_JOBS``), so a pass reads a few ids rather
than every queued row of a backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any

from arq.constants import job_key_prefix, result_key_prefix
from arq.utils import timestamp_ms
from sqlalchemy import select

from services.gateway.db.models import Job, utcnow
from services.gateway.jobs.submission import _ENQUEUE, drop_pending
from shared.events import PENDING_JOBS, pending_key, state_key
from shared.specs import JobStatus

logger = logging.getLogger(__name__)

# A row this young may belong to a submission still between its commit and its enqueue.
GRACE_S = 5.0
_PAGE = 500
NOT_QUEUED = {"code": "not_queued", "message": "the job was recorded but the queue no longer "
              "holds its task (Redis restarted empty, or it waited longer than "
              "LOOMIS_REDIS__JOB_TTL_S); submit it again"}

# The submission's enqueue, only while the job's live state is still ``queued``: a job canceled
# (or forgotten, its state scrubbed) since the snapshot is not queued, and its task is dropped.
_ENQUEUE_IF_QUEUED = """
if redis.call('hget', KEYS[6], 'state') ~= 'queued' then
  redis.call('del', KEYS[4])
  redis.call('zrem', KEYS[5], ARGV[4])
  return -1
end
""" + _ENQUEUE
# Present while Redis still holds what submissions wrote: when it is missing (first pass on
# this Redis, or Redis restarted empty) every queued row is checked, not only the index.
_KNOWN = "loomis:recovery:known"
# Every this many passes the rows are checked whole anyway, for whatever the index missed.
FULL_EVERY = 20
# An indexed id with no row this long after its submission is a request that died before
# its row was written (a younger one may still be committing).
ORPHAN_AFTER_S = 60.0


class QueueRecovery:
    def __init__(self, state: Any, *, interval_s: float) -> None:
        self.state = state
        self.interval_s = interval_s
        self.passes = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a database or Redis outage: the next pass retries
                logger.warning("queue recovery pass failed; retrying", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    async def sweep(self) -> dict[str, int]:
        """One pass; how many jobs were queued and failed.

        A pass reads the index of held tasks (a few ids: the jobs between their commit and
        their enqueue, and any a killed gateway left), not every queued row, which costs
        seconds of the gateway's CPU under a backlog of tens of thousands. The rows are read
        whole on this Redis's first pass, after it restarted empty, and every FULL_EVERY."""
        redis = self.state.redis
        self.passes += 1
        if self.passes % FULL_EVERY and await redis.exists(_KNOWN):
            return await self._sweep_index()
        counts = await self._sweep_rows()
        await redis.set(_KNOWN, "1")
        return counts

    async def _sweep_index(self) -> dict[str, int]:
        redis = self.state.redis
        now = timestamp_ms()
        counts = {"queued": 0, "failed": 0}
        offset = 0
        while True:
            page = await redis.zrangebyscore(PENDING_JOBS, "-inf", now - GRACE_S * 1000,
                                             start=offset, num=_PAGE, withscores=True)
            if not page:
                return counts
            held = {_text(job_id): score for job_id, score in page}
            async with self.state.sessionmaker() as session:
                rows = {row.id: row for row in (await session.execute(
                    select(Job.id, Job.tenant_id, Job.status).where(Job.id.in_(held)))).all()}
            queued = [(job_id, rows[job_id].tenant_id) for job_id in held
                      if job_id in rows and rows[job_id].status == JobStatus.QUEUED.value]
            for outcome in await self._recover_page(queued):
                if outcome:
                    counts[outcome] += 1
            young = {job_id for job_id, score in held.items() if job_id not in rows
                     and score > now - ORPHAN_AFTER_S * 1000}
            # what is left of the rest is spent: queued now, ended, refused, or never a row
            await drop_pending(redis, [job_id for job_id in held if job_id not in young])
            offset += len(young)

    async def _sweep_rows(self) -> dict[str, int]:
        cutoff = utcnow() - timedelta(seconds=GRACE_S)
        counts = {"queued": 0, "failed": 0}
        after: tuple[Any, str] | None = None
        while True:
            query = (select(Job.id, Job.tenant_id, Job.created_at)
                     .where(Job.status == JobStatus.QUEUED.value, Job.created_at < cutoff)
                     .order_by(Job.created_at, Job.id).limit(_PAGE))
            if after is not None:
                query = query.where((Job.created_at > after[0])
                                    | ((Job.created_at == after[0]) & (Job.id > after[1])))
            async with self.state.sessionmaker() as session:
                rows = (await session.execute(query)).all()
            if not rows:
                return counts
            for outcome in await self._recover_page([(r.id, r.tenant_id) for r in rows]):
                if outcome:
                    counts[outcome] += 1
            after = (rows[-1].created_at, rows[-1].id)

    async def _recover_page(self, jobs: list[tuple[str, str]]) -> list[str | None]:
        redis = self.state.redis
        # One MULTI/EXEC: a consistent snapshot. Without it Redis may run another client's
        # commands between two of the pipeline's, and an enqueue (another gateway's recovery, a
        # slow submission) landing between a job's EXISTS and its HGETALL read as "no task and
        # no pending entry", failing a job that had just been queued. The pending entry is read
        # first too, as the enqueue deletes it and writes the job key in one script.
        async with redis.pipeline(transaction=True) as pipe:
            for job_id, _ in jobs:
                pipe.hgetall(pending_key(job_id))
                pipe.hmget(state_key(job_id), "state", "seq")
                pipe.exists(job_key_prefix + job_id, result_key_prefix + job_id)
            replies = await pipe.execute()
        outcomes: list[str | None] = []
        for index, (job_id, tenant_id) in enumerate(jobs):
            pending, (live, seq), in_queue = replies[3 * index: 3 * index + 3]
            if in_queue or (live is not None and _text(live) != JobStatus.QUEUED.value):
                # queued, running or done as far as Redis knows; the event consumer brings
                # the row up to date
                outcomes.append(None)
                continue
            outcomes.append(await self._recover(job_id, tenant_id, pending,
                                                emitted=seq is not None and _text(seq) != "0"))
        return outcomes

    async def _recover(self, job_id: str, tenant_id: str, pending: dict[bytes, bytes],
                       *, emitted: bool) -> str | None:
        events = self.state.events
        redis = self.state.redis
        if pending:
            # The live state was written with the pending entry: never re-created here, so a
            # job whose state is gone (forgotten, scrubbed since the snapshot) is not queued.
            queue = _text(pending[b"queue"])
            if not emitted:
                await events.emit(job_id, "queued", allowed_from=(JobStatus.QUEUED,),
                                  data={"queue": queue, "recovered": True})
            added = await redis.eval(
                _ENQUEUE_IF_QUEUED, 6, job_key_prefix + job_id, result_key_prefix + job_id,
                queue, pending_key(job_id), PENDING_JOBS, state_key(job_id),
                redis.expires_extra_ms,
                pending[b"job"], int(pending[b"score"]), job_id)
            if int(added) != 1:
                return None
            logger.warning("job %s was committed but never queued; queued it now", job_id)
            return "queued"
        await events.create(job_id, tenant_id=tenant_id)
        transition = await events.emit(job_id, "failed", allowed_from=(JobStatus.QUEUED,),
                                       to=JobStatus.FAILED, data={"error": NOT_QUEUED})
        if transition.event is None:
            return None
        logger.warning("job %s was queued in the database but its task is lost; failed it",
                       job_id)
        return "failed"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

"""Live job state and events in Redis.

Every transition and progress update goes through one Lua script that checks the current
state, bumps the job's ``seq`` and appends the event to two streams atomically:

* ``loomis:events`` — the global stream the gateways consume with a consumer group and
  persist to SQL (at-least-once; ``seq`` lets them drop duplicates and stale events);
* ``loomis:job:{id}:events`` — the job's own stream, which SSE readers block on. Reading a
  stream from an id has no gap between "replay what happened" and "follow what happens",
  which a pub/sub mirror cannot give, so it replaces the pub/sub channel of the design.

Terminal states never change: the script refuses any transition out of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from shared.specs import JobStatus

ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


class JobEvent(BaseModel):
    job_id: str
    seq: int
    type: str = Field(description="queued, running, progress, succeeded, failed, canceled")
    at: datetime
    status: JobStatus
    data: dict[str, Any] = Field(default_factory=dict)


_EMIT = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1, ''} end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == state then allowed = true end
end
if not allowed then return {0, state} end
local new_state = state
if ARGV[2] ~= '' then
  new_state = ARGV[2]
  redis.call('HSET', KEYS[1], 'state', new_state)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local body = string.gsub(ARGV[3], '"__STATUS__"', '"' .. new_state .. '"', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'seq', seq, 'event', body)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100000, '*', 'seq', seq, 'event', body)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return {seq, state}
"""


def state_key(job_id: str) -> str:
    return f"loomis:job:{job_id}"


def job_stream_key(job_id: str) -> str:
    return f"loomis:job:{job_id}:events"


def cancel_key(job_id: str) -> str:
    return f"loomis:job:{job_id}:cancel"


# Ids of jobs whose task is held in a pending entry, scored by submission time (ms): what the
# gateway's queue recovery looks at instead of every queued row.
PENDING_JOBS = "loomis:jobs:pending"


def pending_key(job_id: str) -> str:
    """The task of a job whose row may be committed but which is not queued yet (see
    services/gateway/jobs/submission.py); it holds the task's payload."""
    return f"loomis:job:{job_id}:pending"


def decode_event(fields: dict[bytes, bytes] | dict[str, str]) -> JobEvent:
    """Rebuild an event from a stream entry; ``seq`` is assigned by Redis, not the body."""
    norm = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()}
    body = json.loads(norm["event"])
    return JobEvent(seq=int(norm["seq"]), **body)


class Transition(BaseModel):
    """Outcome of :meth:`JobEvents.emit`: the event written, or why none was."""

    event: JobEvent | None
    previous: str | None


class JobEvents:
    """The one writer of live job state; workers and gateways both go through it."""

    def __init__(self, redis: Redis, *, stream: str, maxlen: int, ttl_s: int) -> None:
        self.redis = redis
        self.stream = stream
        self.maxlen = maxlen
        self.ttl_s = ttl_s
        self._emit = redis.register_script(_EMIT)

    async def create(self, job_id: str, *, tenant_id: str) -> None:
        """Make the job known as ``queued``; called once, before it is enqueued."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.create_into(pipe, job_id, tenant_id=tenant_id)
            await pipe.execute()

    def create_into(self, pipe: Any, job_id: str, *, tenant_id: str) -> None:
        """:meth:`create`'s commands, added to a caller's pipeline (a submission sends them
        with its own in one round trip). Harmless to repeat: every field is set if absent."""
        key = state_key(job_id)
        pipe.hsetnx(key, "state", JobStatus.QUEUED.value)
        pipe.hsetnx(key, "seq", "0")
        pipe.hsetnx(key, "tenant", tenant_id)
        pipe.expire(key, self.ttl_s)

    async def emit(
        self,
        job_id: str,
        event_type: str,
        *,
        allowed_from: Iterable[JobStatus] = ACTIVE,
        to: JobStatus | None = None,
        data: dict[str, Any] | None = None,
    ) -> Transition:
        """Append an event if the job is in one of ``allowed_from``; move it to ``to`` if given."""
        body = {
            "job_id": job_id,
            "type": event_type,
            "at": datetime.now(UTC).isoformat(),
            "status": "__STATUS__",
            "data": data or {},
        }
        allowed = ",".join(s.value for s in allowed_from)
        seq, previous = await self._emit(
            keys=[state_key(job_id), self.stream, job_stream_key(job_id)],
            args=[allowed, to.value if to else "", json.dumps(body), self.maxlen, self.ttl_s],
        )
        prev = previous.decode() if isinstance(previous, bytes) else (previous or None)
        if int(seq) <= 0:
            return Transition(event=None, previous=prev)
        body["status"] = (to or JobStatus(prev or JobStatus.QUEUED)).value
        return Transition(event=JobEvent(seq=int(seq), **body), previous=prev)

    async def state(self, job_id: str) -> JobStatus | None:
        raw: Any = await self.redis.hget(state_key(job_id), "state")  # type: ignore[misc]
        return JobStatus(raw.decode() if isinstance(raw, bytes) else raw) if raw else None

    async def request_cancel(self, job_id: str) -> None:
        await self.redis.set(cancel_key(job_id), 1, ex=self.ttl_s)

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.redis.exists(cancel_key(job_id)))

    async def read_job_stream(
        self, job_id: str, *, after_stream_id: str = "0", block_ms: int | None = None
    ) -> list[tuple[str, JobEvent]]:
        """Events of one job after a stream id; blocks up to ``block_ms`` for new ones."""
        reply = await self.redis.xread(
            {job_stream_key(job_id): after_stream_id}, count=500, block=block_ms
        )
        out: list[tuple[str, JobEvent]] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                out.append((eid, decode_event(fields)))
        return out

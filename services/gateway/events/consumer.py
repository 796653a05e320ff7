"""The gateway's half of the event stream: persist worker events to SQL, exactly once.

Gateways share one consumer group, so replicas split the stream; an event is acknowledged
only after its transaction commits, and events a dead replica read but never acknowledged
are claimed by the living after ``claim_idle_ms``. Re-delivery is harmless because
:func:`apply_event` drops a (job, seq) it has already stored.

An event that cannot be recorded (a worker bug, data the database refuses) must not hold up
the others: a failed batch is re-applied one event at a time, and an event that keeps failing
is retried after ``claim_idle_ms`` up to ``max_attempts`` times, then parked in a dead-letter
stream with its error, and its job fails with ``event_unprocessable``. A lost database or
Redis connection is not the event's fault: it is waited out and never counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError, ResponseError
from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.gateway.db.models import Job
from services.gateway.db.session import WriteLock
from services.gateway.jobs.service import apply_event
from services.gateway.subjects.service import ADVANCE
from services.gateway.webhooks.service import DELIVERIES_QUEUED
from shared.events import ACTIVE, JobEvent, JobEvents, decode_event
from shared.settings import RedisSettings, WebhookSettings
from shared.specs import JobStatus

logger = logging.getLogger(__name__)

UNPROCESSABLE = "event_unprocessable"
# SQLSTATE classes that say nothing about the event: connection, rollback (deadlock,
# serialization), resources, operator intervention, system errors.
_TRANSIENT_SQLSTATES = ("08", "40", "53", "57", "58")
FAILURE_TTL_S = 24 * 3600


def is_transient(exc: BaseException) -> bool:
    """Whether the failure is the infrastructure's (retry without counting), not the event's."""
    if isinstance(exc, RedisError | OSError | TimeoutError | sa_exc.OperationalError
                  | sa_exc.InterfaceError | sa_exc.DisconnectionError | sa_exc.TimeoutError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        sqlstate = str(getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
                       or "")
        return exc.connection_invalidated or sqlstate[:2] in _TRANSIENT_SQLSTATES
    return False


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _job_id_of(fields: dict[Any, Any]) -> str | None:
    """A malformed event's job, when its body still names one."""
    for key, value in fields.items():
        if _text(key) == "event":
            try:
                body = json.loads(_text(value))
            except ValueError:
                return None
            job_id = body.get("job_id") if isinstance(body, dict) else None
            return job_id if isinstance(job_id, str) else None
    return None


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class EventConsumer:
    def __init__(
        self,
        *,
        redis: Any,
        sessionmaker: async_sessionmaker[AsyncSession],
        stream: str,
        group: str,
        name: str | None = None,
        claim_idle_ms: int = 30_000,
        batch: int = 100,
        max_attempts: int = 5,
        dead_letter_stream: str | None = None,
        events: JobEvents | None = None,
        write_lock: WriteLock | None = None,
        on_deliveries: Callable[[], None] | None = None,
        webhook_progress_interval_s: float | None = None,
        on_subjects: Callable[[set[str]], None] | None = None,
    ) -> None:
        self.redis = redis
        self.sessionmaker = sessionmaker
        self.stream = stream
        self.group = group
        self.name = name or consumer_name()
        self.claim_idle_ms = claim_idle_ms
        self.batch = batch
        self.max_attempts = max_attempts
        self.dead_letter_stream = dead_letter_stream or f"{stream}:dead"
        defaults = RedisSettings()
        self.events = events or JobEvents(redis, stream=stream, maxlen=defaults.events_maxlen,
                                          ttl_s=defaults.job_ttl_s)
        self.applied = 0
        self.parked = 0
        self.write_lock = write_lock
        self.on_deliveries = on_deliveries  # wakes the webhook dispatcher
        self.on_subjects = on_subjects  # moves subjects whose stage a committed event changed
        # the consumer applies the progress events, so it holds their webhook throttle
        self.webhook_progress_interval_s = (
            WebhookSettings().progress_interval_s if webhook_progress_interval_s is None
            else webhook_progress_interval_s)

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def claim_stale(self) -> list[tuple[Any, dict[Any, Any]]]:
        """Take over what a dead consumer read but never acknowledged."""
        reply = await self.redis.xautoclaim(
            self.stream, self.group, self.name, min_idle_time=self.claim_idle_ms,
            start_id="0-0", count=self.batch,
        )
        return list(reply[1]) if reply else []

    async def read_new(self, block_ms: int) -> list[tuple[Any, dict[Any, Any]]]:
        reply = await self.redis.xreadgroup(
            self.group, self.name, {self.stream: ">"}, count=self.batch, block=block_ms
        )
        return [entry for _stream, entries in reply or [] for entry in entries]

    async def handle(self, entries: list[tuple[Any, dict[Any, Any]]]) -> int:
        """Apply a batch in one transaction, then acknowledge it; if that fails, apply its
        events one at a time so that one bad event holds up nothing but itself."""
        if not entries:
            return 0
        decoded: list[tuple[Any, dict[Any, Any], JobEvent]] = []
        for entry_id, fields in entries:
            if not fields:  # trimmed away while pending
                continue
            try:
                event = decode_event(fields)
            except (KeyError, ValueError, TypeError) as exc:
                await self._park(entry_id, fields, None, f"malformed event: {exc!r}", attempts=1)
                continue
            decoded.append((entry_id, fields, event))
        if not decoded:
            await self._ack([entry_id for entry_id, _ in entries])
            return 0
        try:
            applied = await self._apply(decoded)
        except Exception as exc:
            if is_transient(exc):
                raise
            if len(decoded) > 1:
                logger.warning("event batch failed (%r); applying its %d events one by one",
                               exc, len(decoded))
            applied = 0
            for entry_id, fields, event in decoded:
                applied += await self._apply_alone(entry_id, fields, event)
            await self._ack([entry_id for entry_id, fields in entries if not fields])
        else:
            await self._ack([entry_id for entry_id, _ in entries])
        self.applied += applied
        return applied

    async def _apply(self, decoded: list[tuple[Any, dict[Any, Any], JobEvent]]) -> int:
        applied = 0
        async with self.write_lock or contextlib.nullcontext(), self.sessionmaker() as session:
            for _entry_id, _fields, event in decoded:
                if await apply_event(
                        session=session, event=event,
                        webhook_progress_interval_s=self.webhook_progress_interval_s):
                    applied += 1
            await session.commit()
            if session.info.pop(DELIVERIES_QUEUED, False) and self.on_deliveries is not None:
                self.on_deliveries()
            subjects = session.info.pop(ADVANCE, None)
            if subjects and self.on_subjects is not None:
                self.on_subjects(subjects)
        return applied

    async def _ack(self, entry_ids: list[Any]) -> None:
        if entry_ids:
            await self.redis.xack(self.stream, self.group, *entry_ids)

    async def _apply_alone(self, entry_id: Any, fields: dict[Any, Any], event: JobEvent) -> int:
        """One event in its own transaction; a failure is counted, and parked at the cap."""
        try:
            applied = await self._apply([(entry_id, fields, event)])
        except Exception as exc:
            if is_transient(exc):
                raise
            key = f"{self.stream}:failures:{_text(entry_id)}"
            attempts = int(await self.redis.incr(key))
            await self.redis.expire(key, FAILURE_TTL_S)
            if attempts < self.max_attempts:
                logger.warning("event %s (job %s, seq %d) failed to apply, attempt %d of %d; "
                               "retried in %d ms: %r", _text(entry_id), event.job_id, event.seq,
                               attempts, self.max_attempts, self.claim_idle_ms, exc)
                return 0  # left pending: claimed again once idle for claim_idle_ms
            await self._park(entry_id, fields, event, repr(exc), attempts=attempts)
            await self.redis.delete(key)
            return 0
        await self._ack([entry_id])
        return applied

    async def _park(self, entry_id: Any, fields: dict[Any, Any], event: JobEvent | None,
                    reason: str, *, attempts: int) -> None:
        """Move an event that cannot be recorded to the dead-letter stream, fail its job and
        acknowledge it, in that order: a crash in between only repeats harmless steps."""
        job_id = event.job_id if event is not None else _job_id_of(fields)
        parked = {_text(k): _text(v) for k, v in fields.items()}
        parked.update({"entry_id": _text(entry_id), "error": reason[:2000],
                       "attempts": str(attempts), "consumer": self.name,
                       "parked_at": datetime.now(UTC).isoformat()})
        await self.redis.xadd(self.dead_letter_stream, parked,
                              maxlen=100_000, approximate=True)
        self.parked += 1
        logger.error("event %s (job %s) parked in %s after %d attempt(s): %s", _text(entry_id),
                     job_id, self.dead_letter_stream, attempts, reason)
        if job_id:
            try:
                await self._fail_job(job_id, event.seq if event is not None else 0, reason)
            except Exception as exc:
                if is_transient(exc):
                    raise
                logger.exception("could not fail job %s after parking its event", job_id)
        await self._ack([entry_id])

    async def _fail_job(self, job_id: str, seq: int, reason: str) -> None:
        """The job ends ``failed``: through the live state while its worker may still emit
        (which also stops the worker), else straight in SQL at a seq after the last applied."""
        error = {"code": UNPROCESSABLE, "message": "an event of this job could not be recorded "
                 f"and was set aside ({reason[:300]}); the job's outcome is unknown"}
        async with self.sessionmaker() as session:
            row = (await session.execute(select(Job.status, Job.last_seq)
                                         .where(Job.id == job_id))).one_or_none()
            if row is None or JobStatus(row.status).terminal:
                return
            transition = await self.events.emit(job_id, "failed", allowed_from=ACTIVE,
                                                to=JobStatus.FAILED, data={"error": error})
            if transition.event is not None:
                await self.events.request_cancel(job_id)
                event = transition.event
            else:  # the worker is done (its terminal event is the one parked) or state expired
                event = JobEvent(job_id=job_id, seq=max(seq, row.last_seq + 1), type="failed",
                                 at=datetime.now(UTC), status=JobStatus.FAILED,
                                 data={"error": error})
            await apply_event(session=session, event=event)
            await session.commit()

    async def process_once(self, *, block_ms: int = 1000) -> int:
        entries = await self.claim_stale()
        if not entries:
            entries = await self.read_new(block_ms)
        return await self.handle(entries)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; survives Redis and database outages with backoff."""
        backoff = 0.5
        group_ready = False
        while not stop.is_set():
            try:
                if not group_ready:
                    await self.ensure_group()
                    group_ready = True
                await self.process_once(block_ms=1000)
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                logger.warning("event consumer: redis unavailable (%s); retrying", exc)
                group_ready = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)
            except Exception:
                logger.exception("event consumer: batch failed; it will be redelivered")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)

"""The gateway's half of the event stream: persist worker events to SQL, exactly once.

Gateways share one consumer group, so replicas split the stream; an event is acknowledged
only after its transaction commits, and events a dead replica read but never acknowledged
are claimed by the living after ``claim_idle_ms``. Re-delivery is harmless because
:func:`apply_event` drops a (job, seq) it has already stored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from typing import Any

from redis.exceptions import RedisError, ResponseError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.gateway.jobs.service import apply_event
from shared.events import decode_event

logger = logging.getLogger(__name__)


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
    ) -> None:
        self.redis = redis
        self.sessionmaker = sessionmaker
        self.stream = stream
        self.group = group
        self.name = name or consumer_name()
        self.claim_idle_ms = claim_idle_ms
        self.batch = batch
        self.applied = 0

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
        """Apply a batch in one transaction, then acknowledge it."""
        if not entries:
            return 0
        applied = 0
        async with self.sessionmaker() as session:
            for entry_id, fields in entries:
                if not fields:  # trimmed away while pending
                    continue
                try:
                    event = decode_event(fields)
                except (KeyError, ValueError):
                    logger.error("dropping malformed event %s", entry_id)
                    continue
                if await apply_event(session=session, event=event):
                    applied += 1
            await session.commit()
        await self.redis.xack(self.stream, self.group, *[entry_id for entry_id, _ in entries])
        self.applied += applied
        return applied

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

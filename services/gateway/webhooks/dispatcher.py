"""The loop that sends webhook deliveries: claim what is due, sign it, send it, record it.

Deliveries are rows (``webhook_deliveries``) with a status and a next attempt time, so a
gateway restart, a Redis restart or a receiver down for hours loses nothing: whatever is due is
sent when a dispatcher next looks. Claiming a row moves it to ``delivering`` with a lease (its
``next_attempt_at`` becomes the lease's end); a dispatcher that dies mid-send leaves the lease to
run out, and the row is sent again (at least once, with the same ``webhook-id``). On PostgreSQL
replicas claim with ``FOR UPDATE SKIP LOCKED``, so every row is attempted by one of them at a
time; on SQLite a row is claimed by a conditional UPDATE under the process's write lock, which
SQLite's single writer makes exclusive across processes too.

What counts (Standard Webhooks practice): a 2xx is success; any other status, a timeout or a
connection error is a failure, retried on ``retry_schedule_s`` with jitter (a ``Retry-After`` on
429/503 is honoured when later); redirects are not followed. 410 Gone disables the endpoint.
An endpoint that has failed everything for ``disable_after_s`` is disabled, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import selectinload

from services.gateway.db.models import (
    Job,
    Subject,
    TenantWebhookSecret,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from services.gateway.db.session import WriteLock
from services.gateway.files.stores import GatewayStore
from services.gateway.jobs.service import job_out
from services.gateway.webhooks.sender import SendResult, send
from services.gateway.webhooks.service import job_secret
from services.gateway.webhooks.signing import signature_header, webhook_headers
from shared.settings import WebhookSettings

logger = logging.getLogger(__name__)

PENDING, DELIVERING, SUCCEEDED, FAILED = "pending", "delivering", "succeeded", "failed"
# A Retry-After beyond this is read as this: a receiver cannot park a delivery for a month.
MAX_RETRY_AFTER_S = 86_400.0
CONCURRENCY = 16


def _now() -> datetime:
    return datetime.now(UTC)


def next_delay(attempts: int, settings: WebhookSettings, *,
               retry_after_s: float | None = None) -> float | None:
    """Seconds until the next attempt after ``attempts`` of them, or None when they are spent."""
    schedule = settings.retry_schedule_s
    if attempts >= len(schedule):
        return None
    delay = schedule[attempts] * (1 + random.uniform(-settings.retry_jitter, settings.retry_jitter))
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, MAX_RETRY_AFTER_S))
    return max(0.0, delay)


def _secrets(holder: WebhookEndpoint | TenantWebhookSecret | None, now: datetime) -> list[str]:
    if holder is None:
        return []
    secrets = [holder.secret]
    until = holder.previous_secret_until
    if holder.previous_secret and until is not None and until > now:
        secrets.append(holder.previous_secret)
    return secrets


class Dispatcher:
    def __init__(self, *, engine: AsyncEngine, sessionmaker: async_sessionmaker[AsyncSession],
                 store: GatewayStore, settings: WebhookSettings, write_lock: WriteLock) -> None:
        self.sessionmaker = sessionmaker
        self.store = store
        self.settings = settings
        self.write_lock = write_lock
        self.postgres = engine.url.get_backend_name() == "postgresql"
        self.sent = 0
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look for due deliveries now rather than at the next interval."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                claimed = await self.dispatch_once()
            except Exception:  # the database is away: try again at the next interval
                logger.exception("webhook dispatch failed; retrying")
                claimed = 0
            if claimed:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.dispatch_interval_s)

    async def dispatch_once(self) -> int:
        """Claim what is due and send it; the number claimed."""
        claimed = await self._claim()
        if not claimed:
            return 0
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(delivery_id: str) -> None:
            async with limit:
                try:
                    await self._deliver(delivery_id)
                except Exception:  # its lease runs out and it is sent again
                    logger.exception("webhook delivery %s failed to record", delivery_id)

        await asyncio.gather(*(one(d) for d in claimed))
        return len(claimed)

    async def _claim(self) -> list[str]:
        now = _now()
        lease = now + timedelta(seconds=self.settings.timeout_s + 60)
        due = (select(WebhookDelivery.id, WebhookDelivery.status, WebhookDelivery.next_attempt_at)
               .where(WebhookDelivery.status.in_((PENDING, DELIVERING)),
                      WebhookDelivery.next_attempt_at <= now)
               .order_by(WebhookDelivery.next_attempt_at)
               .limit(self.settings.dispatch_batch))
        if self.postgres:
            async with self.sessionmaker() as session:
                rows = (await session.execute(due.with_for_update(skip_locked=True))).all()
                ids = [row.id for row in rows]
                if ids:
                    await session.execute(update(WebhookDelivery).where(
                        WebhookDelivery.id.in_(ids)).values(status=DELIVERING,
                                                             next_attempt_at=lease))
                await session.commit()
            return ids
        async with self.sessionmaker() as session:
            rows = (await session.execute(due)).all()  # an idle look takes no write lock
            if not rows:
                return []
            ids = []
            async with self.write_lock:
                for row in rows:
                    changed = await session.execute(update(WebhookDelivery).where(
                        WebhookDelivery.id == row.id, WebhookDelivery.status == row.status,
                        WebhookDelivery.next_attempt_at == row.next_attempt_at,
                    ).values(status=DELIVERING, next_attempt_at=lease))
                    if changed.rowcount == 1:  # type: ignore[attr-defined]
                        ids.append(row.id)
                await session.commit()
        return ids

    async def _payload(self, session: AsyncSession, delivery: WebhookDelivery,
                       now: datetime) -> dict[str, Any] | None:
        stamp = now.isoformat()
        if delivery.subject_id is not None:
            from services.gateway.subjects.service import subject_out

            subject = await session.get(Subject, delivery.subject_id)
            if subject is None:
                return None
            body = await subject_out(session, subject)
            return {"type": delivery.event_type, "timestamp": stamp, "seq": delivery.seq,
                    "data": body.model_dump(mode="json")}
        if delivery.job_id is None:
            return {"type": delivery.event_type, "timestamp": stamp,
                    "data": {"endpoint_id": delivery.endpoint_id}}
        job = await session.scalar(select(Job).where(Job.id == delivery.job_id)
                                   .options(selectinload(Job.artifacts)))
        if job is None:
            return None
        data = job_out(job, store=self.store, artifacts=job.artifacts,
                       url_ttl_s=self.settings.url_ttl_s)
        return {"type": delivery.event_type, "timestamp": stamp, "seq": delivery.seq,
                "data": data.model_dump(mode="json")}

    async def _deliver(self, delivery_id: str) -> None:
        now = _now()
        async with self.sessionmaker() as session:
            delivery = await session.get(WebhookDelivery, delivery_id)
            if delivery is None:
                return
            url, event_id = delivery.url, delivery.event_id
            endpoint = (await session.get(WebhookEndpoint, delivery.endpoint_id)
                        if delivery.endpoint_id else None)
            holder: WebhookEndpoint | TenantWebhookSecret | None = endpoint
            if delivery.endpoint_id is None:
                holder = await session.get(TenantWebhookSecret, delivery.tenant_id)
                if holder is None:
                    # "made on first use": a tenant that never asked for its job secret
                    # still gets its deliveries, and reads the secret whenever it likes
                    async with self.write_lock:
                        holder = await job_secret(session=session, tenant_id=delivery.tenant_id)
            disabled = delivery.endpoint_id is not None and (endpoint is None
                                                             or not endpoint.enabled)
            payload = await self._payload(session, delivery, now)
            secrets = _secrets(holder, now)
        if disabled:
            await self._finish(delivery_id, None, failed="the endpoint is disabled or deleted")
            return
        if payload is None or not secrets:
            await self._finish(delivery_id, None, failed="the job or its signing secret is gone")
            return
        body = json.dumps(payload, separators=(",", ":")).encode()
        if len(body) > self.settings.max_request_bytes:
            await self._finish(delivery_id, None, failed=f"the payload is {len(body)} bytes, "
                               f"over the {self.settings.max_request_bytes}-byte limit")
            return
        timestamp = int(time.time())
        headers = webhook_headers(event_id, timestamp, signature_header(
            secrets, event_id, timestamp, body))
        result = await send(url, body=body, headers=headers,
                            timeout_s=self.settings.timeout_s,
                            max_response_bytes=self.settings.max_response_bytes,
                            allow_private=self.settings.allow_private_networks)
        self.sent += 1
        await self._finish(delivery_id, result)

    async def _finish(self, delivery_id: str, result: SendResult | None, *,
                      failed: str | None = None) -> None:
        """Record the attempt and what follows: done, retry later, or failed for good."""
        now = _now()
        async with self.write_lock, self.sessionmaker() as session:
            delivery = await session.get(WebhookDelivery, delivery_id)
            if delivery is None:
                return
            endpoint = (await session.get(WebhookEndpoint, delivery.endpoint_id)
                        if delivery.endpoint_id else None)
            delivery.last_attempt_at = now
            if result is None:
                session.add(WebhookAttempt(delivery_id=delivery_id, at=now, error=failed))
                delivery.status, delivery.next_attempt_at = FAILED, None
                await session.commit()
                return
            delivery.attempts += 1
            session.add(WebhookAttempt(
                delivery_id=delivery_id, at=now, status_code=result.status,
                latency_ms=round(result.latency_ms, 1), response_head=result.response_head,
                error=result.error))
            if result.ok:
                delivery.status, delivery.next_attempt_at = SUCCEEDED, None
                if endpoint is not None:
                    endpoint.failing_since = None
            elif result.status == 410:
                delivery.status, delivery.next_attempt_at = FAILED, None
                if endpoint is not None:
                    _disable(endpoint, "the receiver answered 410 Gone")
            else:
                delay = next_delay(delivery.attempts, self.settings,
                                   retry_after_s=result.retry_after_s)
                if delay is None:
                    delivery.status, delivery.next_attempt_at = FAILED, None
                else:
                    delivery.status = PENDING
                    delivery.next_attempt_at = now + timedelta(seconds=delay)
                if endpoint is not None:
                    since = endpoint.failing_since or now
                    endpoint.failing_since = since
                    if (now - since).total_seconds() >= self.settings.disable_after_s:
                        _disable(endpoint, f"every delivery failed since {since.isoformat()}")
            await session.commit()


def _disable(endpoint: WebhookEndpoint, reason: str) -> None:
    endpoint.enabled = False
    endpoint.disabled_reason = reason
    logger.warning("webhook endpoint %s disabled: %s", endpoint.id, reason)


"""The dispatcher's decisions on real SQL (a SQLite file, migrated): when to retry, when a
delivery is failed for good, when an endpoint is disabled and why."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from services.gateway.db.models import Tenant, WebhookDelivery, WebhookEndpoint
from services.gateway.db.session import WriteLock, make_engine, make_sessionmaker, migrate
from services.gateway.webhooks.dispatcher import Dispatcher, _now, next_delay
from services.gateway.webhooks.sender import SendResult
from shared.settings import WebhookSettings

SETTINGS = WebhookSettings(retry_schedule_s=[0, 10, 100], retry_jitter=0.0,
                           disable_after_s=5 * 86400)


def result(status: int | None, *, retry_after: float | None = None,
           error: str | None = None) -> SendResult:
    return SendResult(status=status, latency_ms=1.0, response_head="", error=error,
                      retry_after_s=retry_after)


def test_the_schedule_counts_attempts_and_retry_after_only_delays() -> None:
    assert next_delay(1, SETTINGS) == 10 and next_delay(2, SETTINGS) == 100
    assert next_delay(3, SETTINGS) is None  # spent: the delivery is failed
    assert next_delay(1, SETTINGS, retry_after_s=60) == 60
    assert next_delay(1, SETTINGS, retry_after_s=1) == 10  # never sooner than the schedule
    assert next_delay(1, SETTINGS, retry_after_s=10**9) == 86_400  # a month is capped
    jittered = WebhookSettings(retry_schedule_s=[0, 100], retry_jitter=0.1)
    assert all(90 <= (next_delay(1, jittered) or 0) <= 110 for _ in range(50))


async def _scenario(tmp: Path, failing_days: float, outcome: SendResult,
                    attempts: int = 0) -> tuple[Any, Any]:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp / 'db.sqlite'}")
    await migrate(engine)
    sessions = make_sessionmaker(engine)
    async with sessions() as session:
        tenant = Tenant(name=f"t{failing_days}{attempts}{outcome.status}")
        session.add(tenant)
        await session.flush()
        endpoint = WebhookEndpoint(tenant_id=tenant.id, url="https://example.invalid/h",
                                   events=["*.*"], secret="whsec_x",
                                   failing_since=(_now() - timedelta(days=failing_days)
                                                  if failing_days else None))
        session.add(endpoint)
        await session.flush()
        delivery = WebhookDelivery(tenant_id=tenant.id, endpoint_id=endpoint.id,
                                   url=endpoint.url, event_type="ping", event_id="msg_1",
                                   status="delivering", attempts=attempts)
        session.add(delivery)
        await session.commit()
        ids = endpoint.id, delivery.id
    dispatcher = Dispatcher(engine=engine, sessionmaker=sessions, store=None,  # type: ignore[arg-type]
                            settings=SETTINGS, write_lock=WriteLock(engine))
    await dispatcher._finish(ids[1], outcome)
    async with sessions() as session:
        endpoint_after = await session.get(WebhookEndpoint, ids[0])
        delivery_after = await session.get(WebhookDelivery, ids[1])
    await engine.dispose()
    return endpoint_after, delivery_after


@pytest.mark.parametrize(("failing_days", "outcome", "attempts", "status", "enabled", "reason"), [
    (0, result(200), 0, "succeeded", True, None),
    (0, result(500), 0, "pending", True, None),
    (0, result(None, error="timeout after 15s"), 0, "pending", True, None),
    (0, result(500), 2, "failed", True, None),  # the schedule's last attempt
    (0, result(410), 0, "failed", False, "410"),
    (6, result(503), 0, "pending", False, "every delivery failed since"),
    (2, result(503), 0, "pending", True, None),
])
def test_what_follows_an_attempt(tmp_path: Path, failing_days: float, outcome: SendResult,
                                 attempts: int, status: str, enabled: bool,
                                 reason: str | None) -> None:
    endpoint, delivery = asyncio.run(_scenario(tmp_path, failing_days, outcome, attempts))
    assert delivery.status == status and delivery.attempts == attempts + 1
    assert endpoint.enabled is enabled
    assert (reason or "") in (endpoint.disabled_reason or "")
    if status == "pending":
        assert delivery.next_attempt_at > _now()
    if outcome.ok:
        assert endpoint.failing_since is None

"""An event the gateway cannot record holds up nothing but itself.

Before: the consumer applied a batch in one transaction and, when it failed, left the whole
batch pending to be re-claimed every ``claim_idle_ms`` for ever; the job stayed ``running``
and every other job's events behind it waited too. Now the failing event is retried up to
``consumer_max_attempts`` times, parked in the dead-letter stream, and its job fails with
``event_unprocessable``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import select

from services.gateway.db.models import Job, Tenant
from services.gateway.db.session import make_engine, make_sessionmaker
from services.gateway.events.consumer import EventConsumer
from shared.events import JobEvents
from shared.settings import RedisSettings
from shared.specs import JobStatus
from tests.conftest import RunningStack, wait_terminal
from tests.test_resilience import consumer_env  # noqa: F401  (fixture: Redis + SQLite/PostgreSQL)

# Fails to apply on every database: a worker bug reporting an artifact without its fields,
# and (on PostgreSQL) the NUL a training name used to carry into the registered LoRA's name.
POISON = {
    "register_lora": {"id": "lora-poison", "name": "x\u0000y", "family": "sd15",
                      "base_model": "tiny-sd15", "key": "k", "sha256": "0" * 64, "size": 1,
                      "rank": 4},
    "artifacts": [{"key": "out/0.png"}],
    "result": {},
}


async def _jobs(sessionmaker: Any, count: int, *, tenant_id: str | None = None) -> list[str]:
    async with sessionmaker() as session:
        if tenant_id is None:
            tenant = Tenant(name=f"t-{uuid.uuid4().hex[:6]}")
            session.add(tenant)
            await session.flush()
            tenant_id = tenant.id
        jobs = [Job(tenant_id=tenant_id, kind="generation", status="queued", spec={}, result={})
                for _ in range(count)]
        session.add_all(jobs)
        await session.commit()
        return [job.id for job in jobs]


async def _run_to_end(events: JobEvents, job_id: str, *, data: dict[str, Any]) -> None:
    await events.create(job_id, tenant_id="t")
    await events.emit(job_id, "running", to=JobStatus.RUNNING, data={"attempt": 1})
    await events.emit(job_id, "succeeded", allowed_from=(JobStatus.RUNNING,),
                      to=JobStatus.SUCCEEDED, data=data)


async def test_a_poison_event_is_parked_and_fails_its_job_while_others_apply(
    consumer_env: tuple[aioredis.Redis, object],  # noqa: F811
) -> None:
    redis, sessionmaker = consumer_env
    stream = f"events-{uuid.uuid4().hex[:6]}"
    events = JobEvents(redis, stream=stream, maxlen=10_000, ttl_s=600)
    poisoned, before, after = await _jobs(sessionmaker, 3)
    await _run_to_end(events, before, data={"result": {"ok": True}})
    await _run_to_end(events, poisoned, data=POISON)
    await _run_to_end(events, after, data={"result": {"ok": True}})
    consumer = EventConsumer(redis=redis, sessionmaker=sessionmaker,  # type: ignore[arg-type]
                             stream=stream, group="gw", name="gw-1", claim_idle_ms=50, batch=100,
                             max_attempts=3, dead_letter_stream=f"{stream}:dead")
    await consumer.ensure_group()

    # One batch holds all six events: the five good ones are recorded at once.
    assert await consumer.process_once(block_ms=10) == 5
    status = await _statuses(sessionmaker, [before, poisoned, after])
    assert status == {before: ("succeeded", None), poisoned: ("running", None),
                      after: ("succeeded", None)}
    assert await redis.xlen(f"{stream}:dead") == 0

    for _ in range(20):  # retried after claim_idle_ms, parked on the third failure
        await asyncio.sleep(0.06)
        await consumer.process_once(block_ms=10)
        if await redis.xlen(f"{stream}:dead"):
            break
    status = await _statuses(sessionmaker, [poisoned])
    assert status[poisoned] == ("failed", "event_unprocessable")
    assert consumer.parked == 1
    (_id, parked), = await redis.xrange(f"{stream}:dead")
    assert json.loads(parked[b"event"])["job_id"] == poisoned
    assert parked[b"attempts"] == b"3" and parked[b"error"]
    assert (await redis.xpending(stream, "gw"))["pending"] == 0

    # Later events of other jobs keep flowing.
    (later,) = await _jobs(sessionmaker, 1)
    await _run_to_end(events, later, data={"result": {"ok": True}})
    assert await consumer.process_once(block_ms=10) == 2
    assert (await _statuses(sessionmaker, [later]))[later] == ("succeeded", None)


async def test_a_poison_event_of_a_running_job_fails_it_through_the_live_state(
    consumer_env: tuple[aioredis.Redis, object],  # noqa: F811
) -> None:
    """While the worker can still emit, the failure goes through the one writer of job state:
    the worker's next transition is refused and it is asked to stop."""
    redis, sessionmaker = consumer_env
    stream = f"events-{uuid.uuid4().hex[:6]}"
    events = JobEvents(redis, stream=stream, maxlen=10_000, ttl_s=600)
    (job_id,) = await _jobs(sessionmaker, 1)
    await events.create(job_id, tenant_id="t")
    await events.emit(job_id, "running", to=JobStatus.RUNNING, data={"attempt": 1})
    await events.emit(job_id, "progress", data={"progress": "half"})  # float() cannot take it
    consumer = EventConsumer(redis=redis, sessionmaker=sessionmaker,  # type: ignore[arg-type]
                             stream=stream, group="gw", name="gw-1", claim_idle_ms=50,
                             max_attempts=2, events=events)
    await consumer.ensure_group()
    for _ in range(20):
        await consumer.process_once(block_ms=10)
        if consumer.parked:
            break
        await asyncio.sleep(0.06)
    assert await events.state(job_id) is JobStatus.FAILED
    assert await events.cancel_requested(job_id)
    late = await events.emit(job_id, "succeeded", allowed_from=(JobStatus.RUNNING,),
                             to=JobStatus.SUCCEEDED)
    assert late.event is None
    await consumer.process_once(block_ms=10)
    assert (await _statuses(sessionmaker, [job_id]))[job_id] == ("failed", "event_unprocessable")


async def test_a_database_outage_is_waited_out_not_counted(
    consumer_env: tuple[aioredis.Redis, object], tmp_path: Any,  # noqa: F811
) -> None:
    redis, sessionmaker = consumer_env
    stream = f"events-{uuid.uuid4().hex[:6]}"
    events = JobEvents(redis, stream=stream, maxlen=10_000, ttl_s=600)
    (job_id,) = await _jobs(sessionmaker, 1)
    await _run_to_end(events, job_id, data={"result": {"ok": True}})
    # A database that cannot be opened: every attempt fails, none is the event's fault.
    gone = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'db.sqlite'}")
    down = EventConsumer(redis=redis, sessionmaker=make_sessionmaker(gone), stream=stream,
                         group="gw", name="gw-down", claim_idle_ms=10, max_attempts=2)
    await down.ensure_group()
    for _ in range(5):
        with pytest.raises(Exception):  # noqa: B017  (the run loop backs off on it)
            await down.process_once(block_ms=10)
        await asyncio.sleep(0.02)
    await gone.dispose()
    assert down.parked == 0 and await redis.xlen(f"{stream}:dead") == 0
    up = EventConsumer(redis=redis, sessionmaker=sessionmaker,  # type: ignore[arg-type]
                       stream=stream, group="gw", name="gw-up", claim_idle_ms=10, max_attempts=2)
    await asyncio.sleep(0.02)
    assert await up.process_once(block_ms=10) == 2
    assert (await _statuses(sessionmaker, [job_id]))[job_id] == ("succeeded", None)


async def _statuses(sessionmaker: Any, job_ids: list[str]) -> dict[str, tuple[str, str | None]]:
    async with sessionmaker() as session:
        rows = await session.execute(select(Job.id, Job.status, Job.error_code)
                                     .where(Job.id.in_(job_ids)))
        return {job_id: (status, code) for job_id, status, code in rows}


def test_the_gateway_parks_a_poison_event_from_the_workers_stream(stack: RunningStack) -> None:
    """Through the real stream the workers write and the running gateway's consumer: the
    poisoned job fails cleanly, another job's later events still apply, /readyz counts it."""

    async def inject() -> tuple[str, str]:
        engine = make_engine(stack.database_url)
        try:
            async with make_sessionmaker(engine)() as session:
                tenant_id = await session.scalar(select(Tenant.id).where(Tenant.name == "alice"))
            poisoned, later = await _jobs(make_sessionmaker(engine), 2, tenant_id=tenant_id)
        finally:
            await engine.dispose()
        redis = aioredis.Redis.from_url(stack.redis.url)
        try:
            events = JobEvents(redis, stream=RedisSettings().events_stream, maxlen=200_000,
                               ttl_s=600)
            await _run_to_end(events, poisoned, data=POISON)
            await _run_to_end(events, later, data={"result": {"ok": True}})
        finally:
            await redis.aclose()
        return poisoned, later

    with stack.client() as client:
        dead_before = client.get("/readyz").json()["dead_letter_events"]
        started = time.monotonic()
        poisoned, later = asyncio.run(inject())
        assert wait_terminal(client, later, timeout=10)["status"] == "succeeded"
        assert client.get(f"/v1/jobs/{poisoned}").json()["status"] == "running"  # being retried
        failed = wait_terminal(client, poisoned, timeout=30)
        assert failed["status"] == "failed", failed
        assert failed["error"]["code"] == "event_unprocessable"
        assert time.monotonic() - started < 30
        # Its event stream ends too, with the failure.
        events = client.get(f"/v1/jobs/{poisoned}/events", timeout=10).text
        assert "event: failed" in events and "event_unprocessable" in events
        assert client.get("/readyz").json()["dead_letter_events"] == dead_before + 1

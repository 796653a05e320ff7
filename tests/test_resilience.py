"""What happens when parts die: workers, gateway consumers, Redis."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy import func, select

from services.gateway.db.models import Job, JobEventRow, Tenant
from services.gateway.db.session import make_engine, make_sessionmaker, migrate
from services.gateway.events.consumer import EventConsumer
from shared.events import JobEvents
from shared.specs import JobStatus
from tests.conftest import S3Server, launch_stack, redis_server, wait_for_event, wait_terminal


def test_worker_killed_mid_job_is_rerun_once(
    tmp_path: Path, s3_server: S3Server, model_cache: Path
) -> None:
    """The job is re-delivered once the dead worker's lease (20 s) runs out, although its
    timeout (the default, 30 min) is far away."""
    running = launch_stack(
        tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", s3=s3_server,
        model_cache=model_cache,
    )
    try:
        with running.client() as client:
            job = client.post("/v1/generations", json={
                "prompt": "survive", "model": "tiny-sd15", "width": 128, "height": 128,
                "steps": 20, "seed": 5}).json()
            wait_for_event(client, job["id"], "progress")
            first = next(c for c in running.stack.children if c.name == "generator")
            first.popen.send_signal(signal.SIGKILL)
            first.popen.wait(10)
            assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"

            running.stack.start_worker("generator-2")
            # A fresh worker starts and the 20 s lease lapses: slow on a loaded machine.
            done = wait_terminal(client, job["id"], timeout=120)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        tenant_prefix = next(a for a in done["artifacts"] if a["kind"] == "image")
        assert tenant_prefix["seed"] == 5
        keys = [k for k in running.s3_keys("outputs/") if job["id"] in k]
        assert sorted(k.rsplit("/", 1)[1] for k in keys) == ["0.png", "manifest.json"]
        assert [a["kind"] for a in done["artifacts"]] == ["image", "manifest"]
    finally:
        running.stack.stop()
        running.redis.stop()


def test_readyz_reports_a_stopped_redis(
    tmp_path: Path, s3_server: S3Server, model_cache: Path
) -> None:
    running = launch_stack(
        tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", s3=s3_server,
        model_cache=model_cache, worker=False,
    )
    try:
        assert httpx.get(f"{running.url}/readyz").status_code == 200
        running.redis.stop()
        response = httpx.get(f"{running.url}/readyz", timeout=10)
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "not_ready"
        assert body["checks"]["redis"].startswith("error")
        assert body["checks"]["database"] == "ok" and body["checks"]["storage"] == "ok"
        assert httpx.get(f"{running.url}/healthz").status_code == 200

        # Submitting while Redis is down is a clear 503 and leaves no job behind: the task is
        # held in Redis before the row is written, so the refusal comes first.
        with running.client() as client:
            response = client.post("/v1/generations", json={"prompt": "x", "steps": 1})
            assert response.status_code == 503
            assert response.json()["code"] == "queue_unavailable"

        running.redis.restart()
        deadline = time.monotonic() + 15
        while httpx.get(f"{running.url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "gateway did not recover after Redis restart"
            time.sleep(0.2)
        with running.client() as client:
            assert client.get("/v1/jobs").json()["items"] == []

        # Many clients following a job (SSE) must not hold database connections: with no
        # worker the job stays queued and every stream stays open.
        with running.client() as client:
            job_id = client.post("/v1/generations", json={"prompt": "x", "steps": 1}).json()["id"]
            streams = [client.stream("GET", f"/v1/jobs/{job_id}/events") for _ in range(20)]
            opened = [stream.__enter__() for stream in streams]
            try:
                assert all(response.status_code == 200 for response in opened)
                for _ in range(5):
                    assert client.get(f"/v1/jobs/{job_id}").status_code == 200
            finally:
                for stream in streams:
                    stream.__exit__(None, None, None)
    finally:
        running.stack.stop()
        running.redis.stop()


@pytest.fixture(params=["sqlite", "postgres"])
async def consumer_env(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[aioredis.Redis, object]]:
    server = redis_server(tmp_path / "redis")
    url = (f"sqlite+aiosqlite:///{tmp_path / 'c.sqlite'}" if request.param == "sqlite"
           else request.getfixturevalue("pg_database"))
    engine = make_engine(url)
    await migrate(engine)
    client = aioredis.Redis.from_url(server.url)
    yield client, make_sessionmaker(engine)
    await client.aclose()
    await engine.dispose()
    server.stop()


async def test_consumer_restart_loses_nothing_and_applies_nothing_twice(
    consumer_env: tuple[aioredis.Redis, object],
) -> None:
    redis, sessionmaker = consumer_env
    stream = f"events-{uuid.uuid4().hex[:6]}"
    events = JobEvents(redis, stream=stream, maxlen=10_000, ttl_s=600)
    job_ids = []
    async with sessionmaker() as session:  # type: ignore[operator]
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:6]}")
        session.add(tenant)
        await session.flush()
        for _ in range(3):
            job = Job(tenant_id=tenant.id, kind="generation", status="queued", spec={},
                      result={})
            session.add(job)
            await session.flush()
            job_ids.append(job.id)
        await session.commit()
    for job_id in job_ids:
        await events.create(job_id, tenant_id="t")
        await events.emit(job_id, "running", to=JobStatus.RUNNING, data={"attempt": 1})
        for step in range(1, 6):
            await events.emit(job_id, "progress", data={"step": step, "progress": step / 5})
        await events.emit(job_id, "succeeded", to=JobStatus.SUCCEEDED,
                          data={"result": {"ok": True}})
    total = 3 * 7

    def consumer(name: str) -> EventConsumer:
        return EventConsumer(redis=redis, sessionmaker=sessionmaker,  # type: ignore[arg-type]
                             stream=stream, group="gw", name=name, claim_idle_ms=100, batch=4)

    first = consumer("first")
    await first.ensure_group()
    assert await first.process_once(block_ms=10) == 4       # applied and acknowledged
    crashed_batch = await first.read_new(10)                 # read, then "crashed" before commit
    assert len(crashed_batch) == 4
    half_done = await first.read_new(10)                     # committed, "crashed" before XACK
    async with sessionmaker() as session:  # type: ignore[operator]
        from services.gateway.jobs.service import apply_event
        from shared.events import decode_event

        for _id, fields in half_done:
            await apply_event(session=session, event=decode_event(fields))
        await session.commit()

    await asyncio.sleep(0.2)  # the dead consumer's entries become claimable
    second = consumer("second")
    for _ in range(total):  # batches of 4: far more rounds than needed to drain everything
        await second.process_once(block_ms=10)
    assert (await redis.xpending(stream, "gw"))["pending"] == 0

    async with sessionmaker() as session:  # type: ignore[operator]
        stored = (await session.execute(
            select(JobEventRow.job_id, JobEventRow.seq, func.count())
            .where(JobEventRow.job_id.in_(job_ids))
            .group_by(JobEventRow.job_id, JobEventRow.seq)
        )).all()
        jobs = list(await session.scalars(select(Job).where(Job.id.in_(job_ids))))
    assert len(stored) == total
    assert all(count == 1 for _job, _seq, count in stored)
    assert {job.status for job in jobs} == {"succeeded"}
    assert {job.last_seq for job in jobs} == {7}
    assert all(job.result == {"ok": True} and job.progress == 1.0 for job in jobs)
    # Everything is acknowledged: a third consumer finds nothing to do.
    assert await consumer("third").process_once(block_ms=10) == 0


async def test_terminal_state_never_changes(tmp_path: Path) -> None:
    server = redis_server(tmp_path / "redis")
    redis = aioredis.Redis.from_url(server.url)
    try:
        events = JobEvents(redis, stream="s", maxlen=100, ttl_s=60)
        await events.create("j", tenant_id="t")
        assert (await events.emit("j", "canceled", allowed_from=(JobStatus.QUEUED,),
                                  to=JobStatus.CANCELED)).event is not None
        late = await events.emit("j", "running", to=JobStatus.RUNNING)
        assert late.event is None and late.previous == "canceled"
        assert await events.state("j") is JobStatus.CANCELED
        assert (await events.emit("unknown", "running", to=JobStatus.RUNNING)).event is None
    finally:
        await redis.aclose()
        server.stop()


async def test_two_writers_applying_one_event_do_not_deadlock(
    consumer_env: tuple[aioredis.Redis, object],
) -> None:
    """The cancel route (job row updated first) and the consumer (same event) race on
    PostgreSQL; both lock the job row before the event row, so one waits instead of both."""
    from datetime import UTC, datetime

    from services.gateway.jobs.service import apply_event
    from shared.events import JobEvent

    _redis, sessionmaker = consumer_env
    async with sessionmaker() as session:  # type: ignore[operator]
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:6]}")
        session.add(tenant)
        await session.flush()
        job = Job(tenant_id=tenant.id, kind="generation", status="queued", spec={}, result={})
        session.add(job)
        await session.commit()
        job_id = job.id
    event = JobEvent(job_id=job_id, seq=1, type="canceled", at=datetime.now(UTC),
                     status=JobStatus.CANCELED, data={"reason": "test"})

    async def route() -> bool:
        async with sessionmaker() as session:  # type: ignore[operator]
            row = await session.get(Job, job_id)
            row.cancel_requested = True
            await session.flush()  # holds the job row, as the cancel route does
            await asyncio.sleep(0.3)  # the consumer starts meanwhile
            changed = await apply_event(session=session, event=event)
            await session.commit()
            return changed

    async def consumer() -> bool:
        await asyncio.sleep(0.1)
        async with sessionmaker() as session:  # type: ignore[operator]
            changed = await apply_event(session=session, event=event)
            await session.commit()
            return changed

    results = await asyncio.wait_for(asyncio.gather(route(), consumer()), timeout=20)
    assert sorted(results) == [False, True]  # applied once, by whichever came first
    async with sessionmaker() as session:  # type: ignore[operator]
        rows = (await session.scalars(select(JobEventRow).where(JobEventRow.job_id == job_id))).all()
        assert len(rows) == 1 and (await session.get(Job, job_id)).status == "canceled"

"""A job committed but never queued (its gateway killed between the two) is queued by the
next gateway's recovery pass, and one whose task Redis lost is failed, never left ``queued``."""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from arq import create_pool
from arq.connections import RedisSettings
from arq.constants import job_key_prefix
from arq.jobs import deserialize_job
from sqlalchemy import select

from services.gateway.db.models import Job, Tenant
from services.gateway.db.session import WriteLock, make_engine, make_sessionmaker, migrate
from services.gateway.events.consumer import EventConsumer
from services.gateway.jobs import recovery, submission
from services.gateway.jobs.inserts import JobInserts
from shared.events import JobEvents
from shared.settings import Settings
from shared.specs import JobKind
from tests.conftest import redis_server


class Killed(BaseException):
    """What a SIGKILL looks like from inside: nothing after it runs, no handler sees it."""


async def test_a_committed_job_that_never_reached_the_queue_is_queued_or_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = redis_server(tmp_path / "redis")
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    await migrate(engine)
    redis = await create_pool(RedisSettings.from_dsn(server.url))
    write_lock = WriteLock(engine)
    inserts = JobInserts(engine, write_lock)
    sessionmaker = make_sessionmaker(engine)
    state = SimpleNamespace(
        redis=redis, sessionmaker=sessionmaker, write_lock=write_lock, job_inserts=inserts,
        events=JobEvents(redis, stream="loomis:events", maxlen=1000, ttl_s=600),
        settings=Settings())
    try:
        async with sessionmaker() as session:
            tenant = Tenant(name=f"t-{uuid.uuid4().hex[:6]}")
            session.add(tenant)
            await session.commit()

        async def killed_submission(prompt: str) -> str:
            real = submission.enqueue_serialized

            async def die(*args: Any, **kwargs: Any) -> bool:
                raise Killed

            monkeypatch.setattr(submission, "enqueue_serialized", die)
            async with sessionmaker() as session:
                with pytest.raises(Killed):
                    await submission.create_and_enqueue(
                        session=session, state=state, tenant=tenant,  # type: ignore[arg-type]
                        kind=JobKind.GENERATION, spec={"prompt": prompt}, digest="d",
                        idempotency_key=None, task_name="generate", queue="q",
                        payload=lambda job_id: {"job_id": job_id, "prompt": prompt})
            monkeypatch.setattr(submission, "enqueue_serialized", real)
            async with sessionmaker() as session:
                job = await session.scalar(select(Job).where(Job.spec["prompt"].as_string()
                                                             == prompt))
            assert job is not None and job.status == "queued"
            assert await redis.zcard("q") == 0 or job.id.encode() not in await redis.zrange(
                "q", 0, -1)
            return job.id

        job_id = await killed_submission("lost in the gap")
        sweeper = recovery.QueueRecovery(state, interval_s=1)
        # too young: its submission may still be on its way to the queue
        assert await sweeper.sweep() == {"queued": 0, "failed": 0}
        monkeypatch.setattr(recovery, "GRACE_S", 0.0)
        assert await sweeper.sweep() == {"queued": 1, "failed": 0}
        queued = deserialize_job(await redis.get(job_key_prefix + job_id))
        assert (queued.function, queued.args) == (
            "generate", ({"job_id": job_id, "prompt": "lost in the gap"},))
        assert await redis.zrange("q", 0, -1) == [job_id.encode()]
        assert not await redis.exists(submission.pending_key(job_id))
        events = await state.events.read_job_stream(job_id)
        # its queued event was written before the kill: not written twice
        assert [e.type for _, e in events] == ["queued"]
        # a second pass (or another gateway) finds it queued and does nothing
        assert await sweeper.sweep() == {"queued": 0, "failed": 0}
        assert len(await state.events.read_job_stream(job_id)) == 1

        # Redis restarts empty: the queued task and the pending one of a second job are gone
        other = await killed_submission("lost with redis")
        await redis.flushall()
        assert await sweeper.sweep() == {"queued": 0, "failed": 2}
        consumer = EventConsumer(redis=redis, sessionmaker=sessionmaker, stream="loomis:events",
                                 group="gw", name="one", claim_idle_ms=100, batch=10)
        await consumer.ensure_group()
        assert await consumer.process_once(block_ms=10) == 2
        async with sessionmaker() as session:
            rows = {j.id: j for j in await session.scalars(select(Job))}
        assert {(rows[i].status, rows[i].error_code) for i in (job_id, other)} == {
            ("failed", "not_queued")}
        assert await sweeper.sweep() == {"queued": 0, "failed": 0}
    finally:
        await redis.aclose()
        inserts.dispose()
        await engine.dispose()
        server.stop()

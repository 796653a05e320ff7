"""The queue recovery pass: a job committed but never queued (its gateway killed between the
two) is queued by the next gateway, one whose task Redis lost is failed, never left ``queued``;
and its races with other gateways, cancellation and forgetting: recovery never fails a job
that is queued, never queues one that was canceled or forgotten, and no task payload outlives
its job in Redis."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from arq import create_pool
from arq.connections import RedisSettings
from arq.constants import job_key_prefix
from arq.jobs import deserialize_job
from arq.utils import timestamp_ms
from sqlalchemy import select

from services.gateway.db.models import Job, Tenant
from services.gateway.db.session import WriteLock, make_engine, make_sessionmaker, migrate
from services.gateway.events.consumer import EventConsumer
from services.gateway.jobs import recovery, submission
from services.gateway.jobs.inserts import JobInserts
from services.gateway.subjects.forget import scrub_redis
from shared.events import PENDING_JOBS, JobEvents, pending_key, state_key
from shared.settings import Settings
from shared.specs import JobKind, JobStatus
from tests.conftest import redis_server


class Killed(BaseException):
    """What a SIGKILL looks like from inside: nothing after it runs, no handler sees it."""


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Any]:
    server = redis_server(tmp_path / "redis")
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    await migrate(engine)
    redis = await create_pool(RedisSettings.from_dsn(server.url))
    write_lock = WriteLock(engine)
    inserts = JobInserts(engine, write_lock)
    sessionmaker = make_sessionmaker(engine)
    state = SimpleNamespace(
        redis=redis, sessionmaker=sessionmaker, write_lock=write_lock, job_inserts=inserts,
        events=JobEvents(redis, stream="loomis:events", maxlen=100000, ttl_s=600),
        settings=Settings())
    async with sessionmaker() as session:
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:6]}")
        session.add(tenant)
        await session.commit()
        await session.refresh(tenant)
    state.tenant = tenant
    try:
        yield state
    finally:
        await redis.aclose()
        inserts.dispose()
        await engine.dispose()
        server.stop()


async def killed_submission(state: Any, monkeypatch: pytest.MonkeyPatch, prompt: str) -> str:
    real = submission.enqueue_serialized

    async def die(*args: Any, **kwargs: Any) -> bool:
        raise Killed

    monkeypatch.setattr(submission, "enqueue_serialized", die)
    async with state.sessionmaker() as session:
        with pytest.raises(Killed):
            await submission.create_and_enqueue(
                session=session, state=state, tenant=state.tenant,
                kind=JobKind.GENERATION, spec={"prompt": prompt}, digest="d",
                idempotency_key=None, task_name="generate", queue="q",
                payload=lambda job_id: {"job_id": job_id, "prompt": prompt})
    monkeypatch.setattr(submission, "enqueue_serialized", real)
    async with state.sessionmaker() as session:
        job_id = await session.scalar(select(Job.id).where(
            Job.spec["prompt"].as_string() == prompt))
    assert isinstance(job_id, str)
    return job_id


async def test_a_committed_job_that_never_reached_the_queue_is_queued_or_failed(
        env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    state = env
    redis = state.redis
    job_id = await killed_submission(state, monkeypatch, "lost in the gap")
    sweeper = recovery.QueueRecovery(state, interval_s=1)
    # too young: its submission may still be on its way to the queue
    assert await sweeper.sweep() == {"queued": 0, "failed": 0}
    monkeypatch.setattr(recovery, "GRACE_S", 0.0)
    assert await sweeper.sweep() == {"queued": 1, "failed": 0}
    queued = deserialize_job(await redis.get(job_key_prefix + job_id))
    assert (queued.function, queued.args) == (
        "generate", ({"job_id": job_id, "prompt": "lost in the gap"},))
    assert await redis.zrange("q", 0, -1) == [job_id.encode()]
    assert not await redis.exists(pending_key(job_id))
    events = await state.events.read_job_stream(job_id)
    # its queued event was written before the kill: not written twice
    assert [e.type for _, e in events] == ["queued"]
    # a second pass (or another gateway) finds it queued and does nothing
    assert await sweeper.sweep() == {"queued": 0, "failed": 0}
    assert len(await state.events.read_job_stream(job_id)) == 1

    # Redis restarts empty: the queued task and the pending one of a second job are gone
    other = await killed_submission(state, monkeypatch, "lost with redis")
    await redis.flushall()
    assert await sweeper.sweep() == {"queued": 0, "failed": 2}
    consumer = EventConsumer(redis=redis, sessionmaker=state.sessionmaker,
                             stream="loomis:events", group="gw", name="one", claim_idle_ms=100,
                             batch=10)
    await consumer.ensure_group()
    assert await consumer.process_once(block_ms=10) == 2
    async with state.sessionmaker() as session:
        rows = {j.id: j for j in await session.scalars(select(Job))}
    assert {(rows[i].status, rows[i].error_code) for i in (job_id, other)} == {
        ("failed", "not_queued")}
    assert await sweeper.sweep() == {"queued": 0, "failed": 0}


class InterleavingRedis:
    """The real client, except that a non-transactional pipeline's commands are sent one by
    one and ``between(name)`` runs after each: what Redis allows another client to do between
    two commands of a pipeline that is not a MULTI/EXEC."""

    def __init__(self, real: Any, between: Any) -> None:
        self.real, self.between = real, between

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def pipeline(self, transaction: bool = True):  # type: ignore[no-untyped-def]
        if transaction:
            return self.real.pipeline(transaction=True)
        outer = self

        class P:
            def __init__(self) -> None:
                self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

            async def __aenter__(self):  # type: ignore[no-untyped-def]
                return self

            async def __aexit__(self, *exc: Any) -> None:
                return None

            def __getattr__(self, name: str) -> Any:
                def record(*args: Any, **kwargs: Any) -> None:
                    self.calls.append((name, args, kwargs))
                return record

            async def execute(self) -> list[Any]:
                out = []
                for name, args, kwargs in self.calls:
                    out.append(await getattr(outer.real, name)(*args, **kwargs))
                    await outer.between(name)
                return out
        return P()


async def test_an_enqueue_between_two_reads_of_the_snapshot_does_not_fail_the_job(
        env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another gateway's recovery queues the job while this one reads its snapshot: Redis may
    interleave it between two commands of a plain pipeline, so the snapshot is a MULTI/EXEC,
    and the job stays queued instead of failing with not_queued."""
    state = env
    job_id = await killed_submission(state, monkeypatch, "raced")
    monkeypatch.setattr(recovery, "GRACE_S", 0.0)
    other = recovery.QueueRecovery(state, interval_s=1)
    ran: list[dict[str, int]] = []

    async def other_gateway_recovers(name: str) -> None:
        if name == "exists" and not ran:
            ran.append(await other.sweep())
    b_state = SimpleNamespace(**{**vars(state),
                                 "redis": InterleavingRedis(state.redis, other_gateway_recovers)})
    assert await recovery.QueueRecovery(b_state, interval_s=1).sweep() in (
        {"queued": 1, "failed": 0}, {"queued": 0, "failed": 0})
    assert await state.events.state(job_id) is JobStatus.QUEUED
    assert await state.redis.zrange("q", 0, -1) == [job_id.encode()]
    assert await recovery.QueueRecovery(state, interval_s=1).sweep() == {"queued": 0,
                                                                        "failed": 0}


@pytest.mark.parametrize("scrubbed", [False, True], ids=["canceled", "forgotten"])
async def test_a_job_canceled_or_forgotten_after_the_snapshot_is_not_queued(
        env: Any, monkeypatch: pytest.MonkeyPatch, scrubbed: bool) -> None:
    """Cancelled (its state ``canceled``) or forgotten (its state scrubbed) between the snapshot
    and the enqueue: the live state is not re-created as queued, nothing reaches the queue (a
    worker would otherwise run a forgotten subject's job) and the pending task is dropped."""
    state = env
    job_id = await killed_submission(state, monkeypatch, "forgotten")
    monkeypatch.setattr(recovery, "GRACE_S", 0.0)
    real_recover = recovery.QueueRecovery._recover

    async def cancel_first(self, job_id: str, *a: Any, **k: Any):  # type: ignore[no-untyped-def]
        await state.events.emit(job_id, "canceled", allowed_from=(JobStatus.QUEUED,),
                                to=JobStatus.CANCELED)
        if scrubbed:  # subjects/forget.py's scrub_redis
            await state.redis.delete(state_key(job_id))
        return await real_recover(self, job_id, *a, **k)
    monkeypatch.setattr(recovery.QueueRecovery, "_recover", cancel_first)
    assert await recovery.QueueRecovery(state, interval_s=1).sweep() == {"queued": 0,
                                                                        "failed": 0}
    assert await state.redis.zcard("q") == 0
    assert not await state.redis.exists(job_key_prefix + job_id, pending_key(job_id))
    assert await state.events.state(job_id) is (None if scrubbed else JobStatus.CANCELED)


async def test_a_submission_whose_row_is_refused_leaves_no_task_in_redis(
        env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    state = env

    async def refused(*args: Any, **kwargs: Any) -> None:
        raise OSError("database unreachable")
    monkeypatch.setattr(state.job_inserts, "insert", refused)
    async with state.sessionmaker() as session:
        with pytest.raises(OSError):
            await submission.create_and_enqueue(
                session=session, state=state, tenant=state.tenant, kind=JobKind.GENERATION,
                spec={"prompt": "x"}, digest="d", idempotency_key=None, task_name="generate",
                queue="q", payload=lambda job_id: {"job_id": job_id})
    assert await state.redis.keys("loomis:job:*") == []
    assert await state.redis.zcard(PENDING_JOBS) == 0


async def test_forgetting_a_job_scrubs_its_pending_task(
        env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    state = env
    job_id = await killed_submission(state, monkeypatch, "captions of a person")
    assert await state.redis.exists(pending_key(job_id))
    await scrub_redis(state.redis, stream="loomis:events", dead_letter="loomis:dead",
                      job_ids={job_id})
    assert await state.redis.keys("loomis:job:*") == []
    assert await state.redis.zscore(PENDING_JOBS, job_id) is None


async def test_after_its_first_pass_recovery_reads_the_index_not_every_queued_row(
        env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backlog of queued jobs is not read every pass: only the index of held tasks is, and
    the rows whole on this Redis's first pass and every FULL_EVERY passes. Ids whose row never
    came (a request that died before its insert) leave the index once they are old."""
    state = env
    monkeypatch.setattr(recovery, "GRACE_S", 0.0)
    for index in range(30):
        async with state.sessionmaker() as session:
            await submission.create_and_enqueue(
                session=session, state=state, tenant=state.tenant, kind=JobKind.GENERATION,
                spec={"prompt": f"backlog {index}"}, digest="d", idempotency_key=None,
                task_name="generate", queue="q", payload=lambda job_id: {"job_id": job_id})
    assert await state.redis.zcard(PENDING_JOBS) == 0  # each left the index as it was queued
    sweeper = recovery.QueueRecovery(state, interval_s=1)
    assert await sweeper.sweep() == {"queued": 0, "failed": 0}  # the first pass: rows whole
    whole: list[int] = []
    real_rows = recovery.QueueRecovery._sweep_rows

    async def spy(self: Any) -> dict[str, int]:
        whole.append(1)
        return await real_rows(self)
    monkeypatch.setattr(recovery.QueueRecovery, "_sweep_rows", spy)

    job_id = await killed_submission(state, monkeypatch, "in the gap")
    assert await state.redis.zscore(PENDING_JOBS, job_id) is not None
    now = timestamp_ms()
    await state.redis.zadd(PENDING_JOBS, {"died-long-ago": now - 120_000,
                                          "maybe-committing": now - 10_000})
    assert await sweeper.sweep() == {"queued": 1, "failed": 0}
    assert whole == []  # the index, not the 30 queued rows
    assert await state.redis.zrange(PENDING_JOBS, 0, -1) == [b"maybe-committing"]
    assert job_id.encode() in await state.redis.zrange("q", 0, -1)
    for _ in range(recovery.FULL_EVERY - 3):
        await sweeper.sweep()
    assert whole == []
    assert await sweeper.sweep() == {"queued": 0, "failed": 0}
    assert whole == [1]  # the FULL_EVERY-th pass reads the rows whole

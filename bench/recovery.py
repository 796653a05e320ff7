"""Cost of one queue-recovery pass beside a backlog of legitimately queued jobs.

Every gateway runs a pass at start-up and every ``LOOMIS_GATEWAY__QUEUE_RECOVERY_INTERVAL_S``
(services/gateway/jobs/recovery.py). The baseline is the pass that reads the rows whole (every
``queued`` row checked against Redis, what each pass did before the index, and what a pass
still does on a Redis's first pass and every ``FULL_EVERY``); the pass measured against it
reads only the index of held tasks, here holding the few jobs a killed gateway left (which it
queues). Same SQLite database, same real redis-server, same run.

    python bench/recovery.py [--queued 20000] [--held 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arq import create_pool  # noqa: E402
from arq.connections import RedisSettings  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from services.devstack import start_redis, stop_child  # noqa: E402
from services.gateway.db.models import Job, Tenant, utcnow  # noqa: E402
from services.gateway.db.session import WriteLock, make_engine, make_sessionmaker, migrate  # noqa: E402
from services.gateway.jobs import recovery, submission  # noqa: E402
from services.gateway.jobs.inserts import JobInserts  # noqa: E402
from shared.events import JobEvents  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.specs import JobKind  # noqa: E402


class Killed(BaseException):
    """A gateway killed between its commit and its enqueue."""


async def held_job(state: Any, tenant: Tenant) -> None:
    async def die(*args: Any, **kwargs: Any) -> bool:
        raise Killed

    real = submission.enqueue_serialized
    submission.enqueue_serialized = die
    try:
        async with state.sessionmaker() as session:
            await submission.create_and_enqueue(
                session=session, state=state, tenant=tenant, kind=JobKind.GENERATION,
                spec={"prompt": "held"}, digest="d", idempotency_key=None,
                task_name="generate", queue="bench", payload=lambda job_id: {"job_id": job_id})
    except Killed:
        pass
    finally:
        submission.enqueue_serialized = real


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="loomis-recovery-"))
    child, url = start_redis(tmp / "redis")
    engine = make_engine(f"sqlite+aiosqlite:///{tmp / 'db.sqlite'}")
    await migrate(engine)
    redis = await create_pool(RedisSettings.from_dsn(url))
    write_lock = WriteLock(engine)
    inserts = JobInserts(engine, write_lock)
    sessionmaker = make_sessionmaker(engine)
    state = SimpleNamespace(
        redis=redis, sessionmaker=sessionmaker, write_lock=write_lock, job_inserts=inserts,
        events=JobEvents(redis, stream="loomis:events", maxlen=100_000, ttl_s=600),
        settings=Settings())
    recovery.GRACE_S = 0.0  # everything below is old enough to be looked at
    logging.getLogger("services.gateway.jobs.recovery").setLevel(logging.ERROR)
    try:
        async with sessionmaker() as session:
            tenant = Tenant(name=f"bench-{uuid.uuid4().hex[:6]}")
            session.add(tenant)
            await session.commit()
            await session.refresh(tenant)
        # the backlog: rows queued in SQL whose tasks wait in arq's queue, as submissions leave
        started = time.perf_counter()
        now = utcnow()
        ids = [str(uuid.uuid4()) for _ in range(args.queued)]
        async with engine.begin() as connection:
            for chunk in range(0, len(ids), 1000):
                await connection.execute(insert(Job), [
                    {"id": job_id, "tenant_id": tenant.id, "kind": "generation",
                     "status": "queued", "spec": {}, "result": {}, "progress": 0.0,
                     "last_seq": 0, "attempts": 0, "cancel_requested": False,
                     "created_at": now, "updated_at": now} for job_id in ids[chunk:chunk + 1000]])
        for job_id in ids:
            await submission.enqueue(redis, queue="bench", task="generate", job_id=job_id,
                                     payload={"job_id": job_id})
        print(f"backlog: {args.queued} queued jobs in SQL and in arq's queue "
              f"({time.perf_counter() - started:.1f}s to build)")

        sweeper = recovery.QueueRecovery(state, interval_s=1)
        whole, index = [], []
        for _ in range(args.repeats):
            for _ in range(args.held):
                await held_job(state, tenant)
            t0 = time.perf_counter()
            counts = await sweeper._sweep_rows()  # the baseline: every queued row
            whole.append(time.perf_counter() - t0)
            assert counts == {"queued": args.held, "failed": 0}, counts
            for _ in range(args.held):
                await held_job(state, tenant)
            await redis.set("loomis:recovery:known", "1")
            t0 = time.perf_counter()
            counts = await sweeper._sweep_index()
            index.append(time.perf_counter() - t0)
            assert counts == {"queued": args.held, "failed": 0}, counts
        full, held = statistics.median(whole), statistics.median(index)
        print(f"pass reading every queued row (baseline): {full * 1000:8.1f} ms (median of "
              f"{args.repeats})")
        print(f"pass reading the index of held tasks:     {held * 1000:8.1f} ms")
        print(f"ratio: {full / held:.0f}x less per pass; at the default 15 s interval the "
              f"baseline spent {full / 15 * 100:.1f}% of a gateway's CPU on it")
    finally:
        await redis.aclose()
        inserts.dispose()
        await engine.dispose()
        stop_child(child)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queued", type=int, default=20_000)
    parser.add_argument("--held", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    asyncio.run(main(parser.parse_args()))

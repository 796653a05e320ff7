"""Processes dying under a running stack: leases, Redis restarts, ``loomis up`` restarting.

The worker tests run the real Loomis arq worker (``make_worker``) in-process against a real
redis-server; the stack tests kill real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from arq import create_pool
from arq.connections import ArqRedis
from arq.connections import RedisSettings as ArqRedisSettings
from arq.constants import in_progress_key_prefix
from arq.jobs import Job
from arq.worker import func

from services.jobrunner import make_worker
from shared.settings import Settings
from tests.conftest import RedisServer, redis_server

QUEUE = "loomis:queue:test"


async def _nothing(_ctx: dict[str, Any]) -> None:
    return None


def _worker(url: str, task: Callable[..., Awaitable[Any]], max_jobs: int = 1,
            **worker: float) -> Any:
    settings = Settings(redis={"url": url}, worker=worker)  # type: ignore[arg-type]
    return make_worker(settings, functions=[func(task, name="task")], queue=QUEUE,
                       startup=_nothing, job_timeout_s=3600, max_tries=3, poll_delay_s=0.05,
                       max_jobs=max_jobs)


@contextlib.asynccontextmanager
async def _running(worker: Any) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(worker.async_run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(worker.close(), 5)


async def _pool(server: RedisServer) -> ArqRedis:
    return await create_pool(ArqRedisSettings.from_dsn(server.url), default_queue_name=QUEUE)


async def _result(job: Job, timeout: float) -> Any:
    """The job's result; polls rather than blocking, so a Redis restart in between is fine."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = None
        with contextlib.suppress(OSError, ConnectionError, Exception):
            info = await job.result_info()
        if info is not None:
            assert info.success, info.result
            return info.result
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job.job_id} has no result after {timeout}s")


@pytest.fixture
def redis(tmp_path: Path) -> Any:
    server = redis_server(tmp_path / "redis")
    yield server
    server.stop()


async def test_a_live_worker_keeps_its_job_past_the_lease(redis: RedisServer) -> None:
    """The lease is short, the job is long: renewals keep a second worker from taking it."""
    runs: list[int] = []

    async def slow(ctx: dict[str, Any]) -> str:
        runs.append(ctx["job_try"])
        await asyncio.sleep(4)
        return "done"

    pool = await _pool(redis)
    first = _worker(redis.url, slow, lease_s=1, lease_renew_s=0.2)
    second = _worker(redis.url, slow, lease_s=1, lease_renew_s=0.2)
    async with _running(first):
        job = await pool.enqueue_job("task", _job_id="long")
        assert job is not None
        while not runs:
            await asyncio.sleep(0.05)
        ttl_ms = await pool.pttl(in_progress_key_prefix + "long")
        assert 0 < ttl_ms <= 1000  # a lease, not arq's job timeout + 10 s
        async with _running(second):
            assert await _result(job, 20) == "done"
    assert runs == [1]
    await pool.aclose()


async def test_worker_rides_out_a_redis_restart(redis: RedisServer) -> None:
    """A job running across a 5 s outage finishes once; a job queued after it runs too.

    The worker has a free slot, so it keeps polling the queue through the outage, as an
    idle worker does; the running job reports progress to Redis through it, as every job does.
    """
    started: list[str] = []

    async def work(ctx: dict[str, Any], seconds: float) -> str:
        started.append(ctx["job_id"])
        for step in range(int(seconds / 0.25)):
            await asyncio.sleep(0.25)
            await ctx["redis"].set(f"progress:{ctx['job_id']}", step)
        return str(ctx["job_id"])

    worker = _worker(redis.url, work, max_jobs=2)
    async with _running(worker) as running:
        pool = await _pool(redis)
        across = await pool.enqueue_job("task", 7, _job_id="across")
        assert across is not None
        while not started:
            await asyncio.sleep(0.05)
        await pool.aclose()

        redis.stop()
        await asyncio.sleep(5)
        assert not running.done(), "the worker ended during the outage"
        redis.restart()

        pool = await _pool(redis)
        assert await _result(across, 30) == "across"
        after = await pool.enqueue_job("task", 0, _job_id="after")
        assert after is not None
        assert await _result(after, 30) == "after"
        assert not running.done()
        assert started == ["across", "after"]  # nothing ran twice
        await pool.aclose()

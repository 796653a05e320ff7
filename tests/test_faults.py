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

import httpx
import pytest
from arq import create_pool
from arq.connections import ArqRedis
from arq.connections import RedisSettings as ArqRedisSettings
from arq.constants import in_progress_key_prefix
from arq.jobs import Job
from arq.worker import func

from services.jobrunner import make_worker
from shared.settings import Settings
from tests.conftest import (
    RedisServer,
    S3Server,
    launch_stack,
    redis_server,
    wait_for_event,
    wait_terminal,
)
from tests.test_trainings_e2e import training_zip

QUEUE = "loomis:queue:test"


async def _nothing(ctx: dict[Any, Any]) -> None:
    return None


def _worker(url: str, task: Callable[..., Awaitable[Any]], max_jobs: int = 1,
            **worker: float) -> Any:
    settings = Settings(redis={"url": url}, worker=worker)  # type: ignore[arg-type]
    return make_worker(settings, functions=[func(task, name="task")],  # type: ignore[arg-type]
                       queue=QUEUE,
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


def _training(dataset_id: str, steps: int) -> dict[str, Any]:
    return {"name": f"outage-{steps}", "dataset_id": dataset_id,
            "data": {"resolution": 64, "batch_size": 2, "min_bucket_reso": 64,
                     "max_bucket_reso": 128},
            "network": {"rank": 4}, "optim": {"max_train_steps": steps, "seed": 2}}


def _wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        assert time.monotonic() < deadline, f"{url} not ready after {timeout}s"
        time.sleep(0.2)


def test_every_worker_and_the_gateway_ride_out_a_redis_restart(
    tmp_path: Path, s3_server: S3Server, model_cache: Path
) -> None:
    """Redis stops for 5 s under a training: no process exits, the training finishes in one
    attempt, and a generation, a tagging and a training submitted afterwards all succeed
    (their events reach SQL, so the gateway's consumer came back too)."""
    running = launch_stack(
        tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", s3=s3_server,
        model_cache=model_cache, tagger=True, trainer=True)
    try:
        with running.client() as client:
            dataset_id = client.post("/v1/datasets", data={"name": "d", "min_side": "64"},
                                     files=[("zip", ("d.zip", training_zip(),
                                                     "application/zip"))]).json()["id"]
            across = client.post("/v1/trainings", json=_training(dataset_id, 12)).json()
            wait_for_event(client, across["id"], "progress")
            assert client.get(f"/v1/jobs/{across['id']}").json()["status"] == "running"

            running.redis.stop()
            time.sleep(5)
            exited = [c.name for c in running.stack.children if not c.alive()]
            running.redis.restart()
            assert exited == [], f"exited during the outage: {exited}"
            _wait_ready(running.url)

            after = [
                client.post("/v1/generations", json={
                    "prompt": "after", "model": "tiny-sd15", "width": 64, "height": 64,
                    "steps": 2, "seed": 1}),
                client.post("/v1/taggings", json={"dataset_id": dataset_id, "caption": None}),
                client.post("/v1/trainings", json=_training(dataset_id, 2)),
            ]
            assert [r.status_code for r in after] == [202, 202, 202], [r.text for r in after]
            done = [wait_terminal(client, r.json()["id"], timeout=120) for r in after]
            assert [(j["kind"], j["status"]) for j in done] == [
                ("generation", "succeeded"), ("tagging", "succeeded"),
                ("training", "succeeded")], done
            finished = wait_terminal(client, across["id"], timeout=120)
            assert finished["status"] == "succeeded", finished
            assert finished["attempts"] == 1  # rode it out, was not re-run
            assert [c.name for c in running.stack.children if not c.alive()] == []
    finally:
        running.stack.stop()
        running.redis.stop()


def _children(pid: int) -> dict[str, int]:
    """The processes ``loomis up`` started, by role: {"redis": pid, "gateway": pid, ...}."""
    roles = {"redis-server": "redis", "uvicorn": "gateway", "services.generator": "generator",
             "services.tagger": "tagger", "services.trainer": "trainer"}
    found: dict[str, int] = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            role = next((r for marker, r in roles.items() if marker in cmdline), None)
            if role:
                found[role] = int(child)
    return found


def _wait_children(pid: int, expect: set[str], timeout: float = 30) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while (found := _children(pid)).keys() != expect:
        assert time.monotonic() < deadline, f"children {found}, expected {expect}"
        time.sleep(0.2)
    return found


def test_loomis_up_restarts_what_dies_and_keeps_the_rest(
    tmp_path: Path, model_cache: Path
) -> None:
    """SIGKILL the generator, then Redis, then the gateway under ``loomis up``: each comes
    back on its own, nothing else is restarted, and jobs keep working."""
    import os
    import signal
    import subprocess
    import sys

    from services.devstack import free_port

    port = free_port()
    env = {**os.environ, "LOOMIS_DATA_DIR": str(tmp_path / "data"), "LOOMIS_ENV": "test",
           "LOOMIS_MODELS__CACHE_DIR": str(model_cache), "HF_HUB_OFFLINE": "1"}
    env = {k: v for k, v in env.items() if k not in ("LOOMIS_DB__URL", "LOOMIS_REDIS__URL")}
    out = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-c", "from services.cli import main; raise SystemExit(main())",
         "up", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    everything = {"redis", "gateway", "generator", "tagger", "trainer"}

    def log() -> str:
        return (tmp_path / "up.log").read_text(errors="replace")

    def generate(client: httpx.Client) -> None:
        job = client.post("/v1/generations", json={
            "prompt": "still here", "model": "tiny-sd15", "width": 64, "height": 64,
            "steps": 2, "seed": 3})
        assert job.status_code == 202, job.text
        assert wait_terminal(client, job.json()["id"], timeout=120)["status"] == "succeeded"

    try:
        deadline = time.monotonic() + 240
        while "Loomis is up" not in log():
            assert up.poll() is None and time.monotonic() < deadline, log()
            time.sleep(0.5)
        key = (tmp_path / "data" / "dev-api-key").read_text().strip()
        before = _wait_children(up.pid, everything)
        with httpx.Client(base_url=url, timeout=30,
                          headers={"Authorization": f"Bearer {key}"}) as client:
            for victim in ("generator", "redis", "gateway"):
                os.kill(before[victim], signal.SIGKILL)
                deadline = time.monotonic() + 30
                while (now := _children(up.pid)).get(victim) in (None, before[victim]):
                    assert up.poll() is None, f"loomis up exited after the {victim} died"
                    assert time.monotonic() < deadline, f"{victim} not restarted: {log()}"
                    time.sleep(0.2)
                now = _wait_children(up.pid, everything)
                assert {r: p for r, p in now.items() if r != victim} == {
                    r: p for r, p in before.items() if r != victim}, "others were restarted"
                before = now
                _wait_ready(url, timeout=60)
                generate(client)
        assert "generator (pid" in log() and "killed by SIGKILL" in log()
        assert log().count("restarted (pid") == 3
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            assert up.wait(60) == 0
        finally:
            if up.poll() is None:
                up.kill()
            out.close()

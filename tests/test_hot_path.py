"""The lean hot path keeps every guarantee the slow one had.

Submissions are committed together (group commit) and reads run on an engine of their own
(a sync one over a SQLite file; autocommit without pre-ping on PostgreSQL). These tests pin what
that must not change: a racing Idempotency-Key in a burst fails nobody else, a job is readable
the moment its 202 arrives, and a read survives the server dropping its connections.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import PG_ADMIN_URL, RunningStack

SPEC = {"prompt": "hot path", "width": 64, "height": 64, "steps": 1}


async def _burst_with_one_key(stack: RunningStack, key: str) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {stack.keys['alice']}"}
    async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=120) as client:
        async def submit(index: int) -> httpx.Response:
            # every third request races on one key; the rest are plain submissions
            racing = index % 3 == 0
            return await client.post("/v1/generations", json=SPEC if racing else {
                **SPEC, "prompt": f"hot path {index}"},
                headers={"Idempotency-Key": key} if racing else {})

        return list(await asyncio.gather(*(submit(i) for i in range(30))))


@pytest.mark.parametrize("stack", ["sqlite", "postgres"], indirect=True)
def test_a_racing_idempotency_key_in_a_batch_fails_no_other_submission(
        stack: RunningStack) -> None:
    key = f"race-{urlsplit(stack.url).port}"
    responses = asyncio.run(_burst_with_one_key(stack, key))
    assert [r.status_code for r in responses if r.status_code >= 300] == []
    racing = {r.json()["id"] for i, r in enumerate(responses) if i % 3 == 0}
    plain = {r.json()["id"] for i, r in enumerate(responses) if i % 3}
    assert len(racing) == 1, racing  # one job for the key, every racer answered with it
    assert len(plain) == 20 and not plain & racing
    with stack.client() as client:
        for job_id in plain | racing:
            assert client.get(f"/v1/jobs/{job_id}").status_code == 200


@pytest.mark.parametrize("stack", ["sqlite", "postgres"], indirect=True)
def test_a_job_is_readable_the_moment_its_202_arrives(stack: RunningStack) -> None:
    with stack.client() as client:
        for index in range(20):
            created = client.post("/v1/generations", json={**SPEC, "prompt": f"read {index}"})
            assert created.status_code == 202, created.text
            read = client.get(f"/v1/jobs/{created.json()['id']}")
            assert read.status_code == 200, read.text
            assert read.json()["id"] == created.json()["id"]
            assert read.json()["status"] in ("queued", "running", "succeeded")


@pytest.mark.parametrize("stack", ["postgres"], indirect=True)
def test_reads_survive_the_server_dropping_their_connections(stack: RunningStack) -> None:
    import psycopg

    database = urlsplit(stack.database_url).path.lstrip("/")
    with stack.client() as client:
        job_id = client.post("/v1/generations", json=SPEC).json()["id"]
        for _ in range(5):  # fill the read pool
            assert client.get(f"/v1/jobs/{job_id}").status_code == 200
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            dropped = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()", (database,)).fetchone()
        assert dropped is not None and dropped[0] > 0
        for _ in range(5):
            assert client.get(f"/v1/jobs/{job_id}").status_code == 200
            assert client.get("/v1/jobs").status_code == 200


def test_enqueue_writes_what_arq_enqueue_job_writes(tmp_path: object) -> None:
    """One round trip instead of arq's three, with the same keys, job and queue entry."""
    from pathlib import Path

    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.constants import job_key_prefix
    from arq.jobs import deserialize_job

    from services.devstack import start_redis, stop_child
    from services.gateway.jobs.submission import enqueue

    async def check(url: str) -> None:
        redis = await create_pool(RedisSettings.from_dsn(url))
        try:
            payload = {"job_id": "a", "spec": {"prompt": "x"}}
            assert await enqueue(redis, queue="q", task="generate", job_id="a", payload=payload)
            assert not await enqueue(redis, queue="q", task="generate", job_id="a",
                                     payload=payload)  # already queued: a no-op, as in arq
            await redis.enqueue_job("generate", payload, _job_id="b", _queue_name="q")
            ours, theirs = [deserialize_job(await redis.get(job_key_prefix + i))
                            for i in ("a", "b")]
            assert (ours.function, ours.args, ours.kwargs, ours.job_try) == (
                theirs.function, theirs.args, theirs.kwargs, theirs.job_try)
            ttl_ours, ttl_theirs = [await redis.pttl(job_key_prefix + i) for i in ("a", "b")]
            assert abs(ttl_ours - ttl_theirs) < 5_000
            queued = dict(await redis.zrange("q", 0, -1, withscores=True))
            assert set(queued) == {b"a", b"b"} and abs(queued[b"a"] - ours.enqueue_time.timestamp()
                                                       * 1000) < 1
            assert await redis.enqueue_job("generate", payload, _job_id="a",
                                           _queue_name="q") is None  # arq sees ours as queued
        finally:
            await redis.aclose()

    child, url = start_redis(Path(str(tmp_path)) / "redis")
    try:
        asyncio.run(check(url))
    finally:
        stop_child(child)


TELEMETRY_PROBE = """
import asyncio
from opentelemetry import trace
spans = []
class RecordingTracer(trace.NoOpTracer):
    def start_span(self, name, *args, **kwargs):
        spans.append(name)
        return super().start_span(name, *args, **kwargs)
class RecordingProvider(trace.TracerProvider):
    def get_tracer(self, *args, **kwargs):
        return RecordingTracer()
trace.set_tracer_provider(RecordingProvider())
import httpx
from services.gateway.app import create_app
async def main():
    app = create_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        await c.get("/no-such-path")
asyncio.run(main())
print("SPANS", len(spans))
"""


@pytest.mark.parametrize(("setting", "spans"), [("true", 1), ("false", 0), (None, 0)])
def test_telemetry_setting_decides_whether_requests_make_spans(
        setting: str | None, spans: int) -> None:
    """FastAPI's per-request OpenTelemetry spans follow LOOMIS_GATEWAY__TELEMETRY (off by
    default: checking for a provider on every request cost 6 % of a poll)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "LOOMIS_GATEWAY__TELEMETRY"}
    if setting is not None:
        env["LOOMIS_GATEWAY__TELEMETRY"] = setting
    out = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE], env=env, text=True,
                         capture_output=True, timeout=120, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert f"SPANS {spans}" in out, out

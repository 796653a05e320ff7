"""Real components for every test: a private redis-server, moto's S3 server over HTTP,
SQLite and PostgreSQL, and the gateway and generator worker as subprocesses.

Nothing here is mocked; the only thing that cannot run on our machines is real model
weights, so workers use the tiny random-weight model built locally into a shared cache.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import pytest

from services.devstack import Child, Stack, free_port, start_redis, stop_child, wait_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PG_ADMIN_URL = os.environ.get("LOOMIS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass
class RedisServer:
    child: Child
    url: str
    data_dir: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def stop(self) -> None:
        stop_child(self.child)

    def restart(self) -> None:
        self.child, self.url = start_redis(self.data_dir, self.port)


def redis_server(tmp: Path) -> RedisServer:
    child, url = start_redis(tmp)
    return RedisServer(child, url, tmp)


@dataclass
class S3Server:
    url: str
    popen: subprocess.Popen[bytes]

    def client(self):  # type: ignore[no-untyped-def]
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")

    def env(self, bucket: str) -> dict[str, str]:
        return {
            "LOOMIS_STORAGE__BACKEND": "s3",
            "LOOMIS_STORAGE__ENDPOINT_URL": self.url,
            "LOOMIS_STORAGE__BUCKET": bucket,
            "LOOMIS_STORAGE__ACCESS_KEY_ID": "test",
            "LOOMIS_STORAGE__SECRET_ACCESS_KEY": "test",
        }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    popen = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    wait_port(port, timeout=20.0)
    yield S3Server(f"http://127.0.0.1:{port}", popen)
    popen.terminate()
    popen.wait(10)


def _pg_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), 0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this run, dropped afterwards."""
    yield from fresh_pg_database()


def fresh_pg_database() -> Iterator[str]:
    """A new database (a stack of its own must not share tenants and jobs with another)."""
    if not _pg_reachable():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432 (.ci/run starts it)")
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432; SQLite runs still cover this")
    import psycopg

    name = f"loomis_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny-model cache for the whole run: the first worker builds it, the rest load it."""
    return tmp_path_factory.mktemp("models")


def create_key(database_url: str, tenant: str) -> str:
    from services.gateway.auth.service import provision_api_key

    return asyncio.run(provision_api_key(database_url=database_url, tenant_name=tenant))


@dataclass
class RunningStack:
    stack: Stack
    redis: RedisServer
    database_url: str
    bucket: str
    s3: S3Server
    keys: dict[str, str]

    @property
    def url(self) -> str:
        return self.stack.url

    def client(self, tenant: str = "alice") -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30,
                            headers={"Authorization": f"Bearer {self.keys[tenant]}"})

    def s3_keys(self, prefix: str) -> list[str]:
        page = self.s3.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for obj in page.get("Contents", []))


def launch_stack(
    tmp: Path, *, database_url: str, s3: S3Server, model_cache: Path, worker: bool = True,
    extra_env: dict[str, str] | None = None, tagger: bool = False, trainer: bool = False,
) -> RunningStack:
    redis = redis_server(tmp / "redis-data")
    bucket = f"loomis-{uuid.uuid4().hex[:8]}"
    env = {
        "LOOMIS_ENV": "test",
        "LOOMIS_DB__URL": database_url,
        "LOOMIS_MODELS__CACHE_DIR": str(model_cache),
        "LOOMIS_GATEWAY__CONSUMER_CLAIM_IDLE_MS": "2000",
        "LOOMIS_GATEWAY__CONSUMER_MAX_ATTEMPTS": "3",
        # a job a killed gateway committed but never queued is queued again within 2 s
        "LOOMIS_GATEWAY__QUEUE_RECOVERY_INTERVAL_S": "2",
        # webhook receivers in tests listen on loopback over http; a test of the SSRF rules
        # turns these off in its own stack (extra_env)
        "LOOMIS_WEBHOOKS__ALLOW_HTTP": "true",
        "LOOMIS_WEBHOOKS__ALLOW_PRIVATE_NETWORKS": "true",
        **s3.env(bucket),
        **(extra_env or {}),
    }
    stack = Stack(data_dir=tmp, port=free_port(), redis_url=redis.url, env=env)
    keys = {tenant: create_key(database_url, tenant) for tenant in ("alice", "bob")}
    try:
        stack.start(own_redis=False, worker=worker, tagger=tagger, trainer=trainer)
    except BaseException:
        redis.stop()
        raise
    return RunningStack(stack, redis, database_url, bucket, s3, keys)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
    s3_server: S3Server, model_cache: Path,
) -> Iterator[RunningStack]:
    """The whole stack on SQLite and on PostgreSQL; every e2e test runs against both."""
    tmp = tmp_path_factory.mktemp(f"stack-{request.param}")
    if request.param == "sqlite":
        database_url = f"sqlite+aiosqlite:///{tmp / 'loomis.db'}"
    else:
        database_url = request.getfixturevalue("pg_database")
    running = launch_stack(tmp, database_url=database_url, s3=s3_server, model_cache=model_cache,
                           tagger=True, trainer=True)
    yield running
    running.stack.stop()
    running.redis.stop()


def wait_terminal(client: httpx.Client, job_id: str, timeout: float = 60.0) -> dict:  # type: ignore[type-arg]
    """Poll until the job is finished as SQL records it (what every client sees)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not finished after {timeout}s: {job}")


def wait_for_event(client: httpx.Client, job_id: str, event_type: str) -> None:
    """Block on the job's SSE stream until an event of ``event_type`` arrives."""
    from httpx_sse import connect_sse

    with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as source:
        for sse in source.iter_sse():
            if sse.event == event_type:
                return
    raise AssertionError(f"stream of {job_id} ended without a {event_type} event")

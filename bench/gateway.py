"""Gateway hot-path throughput: the API's read and submit endpoints under wrk, against a bare
FastAPI app doing the same database work, measured in the same run.

Starts everything itself: moto's S3 server, per backend a private redis-server, a gateway
under uvicorn (one process, no workers, so only the gateway, Redis and the database work)
and a baseline app (one SQL read; one insert + one arq enqueue) on the same database and
Redis. Seeds a tenant, an API key and jobs with artifacts, then runs wrk against each
endpoint for ``--seconds`` and prints req/s, p50 and p99 per endpoint and backend, and the
gateway's share of the baseline.

    python bench/gateway.py [--backend sqlite|postgres|both] [--seconds 5] [--connections 32]

Needs ``wrk`` (apt-get install -y wrk). PostgreSQL is used at 127.0.0.1:5432 (override with
LOOMIS_TEST_PG); it is skipped with a message when unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.devstack import Child, Stack, free_port, start_redis, stop_child, wait_port  # noqa: E402

PG_ADMIN_URL = os.environ.get("LOOMIS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
SPEC = {"prompt": "a red fox in snow", "model": "tiny-sd15", "steps": 1, "width": 64,
        "height": 64}
SEEDED_JOBS = 200


def create_baseline_app() -> Any:
    """The floor: FastAPI, one pooled connection, Core SQL; no auth, no ORM, no schemas."""
    import contextlib

    from arq import create_pool
    from arq.connections import RedisSettings
    from fastapi import FastAPI
    from sqlalchemy import text

    from services.gateway.db.session import make_engine

    job_id = os.environ["BENCH_JOB_ID"]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = make_engine(os.environ["LOOMIS_DB__URL"])
        app.state.redis = await create_pool(RedisSettings.from_dsn(os.environ["BENCH_REDIS"]))
        async with app.state.engine.begin() as conn:
            await conn.execute(text("CREATE TABLE IF NOT EXISTS bench_rows "
                                    "(id VARCHAR(36) PRIMARY KEY, body TEXT)"))
        yield
        await app.state.redis.aclose()
        await app.state.engine.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/read")
    async def read() -> dict[str, Any]:
        async with app.state.engine.connect() as conn:
            row = (await conn.execute(text("SELECT id, status FROM jobs WHERE id = :id"),
                                      {"id": job_id})).one()
        return {"id": row.id, "status": row.status}

    @app.post("/write", status_code=202)
    async def write(body: dict[str, Any]) -> dict[str, Any]:
        row_id = str(uuid.uuid4())
        async with app.state.engine.begin() as conn:
            await conn.execute(text("INSERT INTO bench_rows (id, body) VALUES (:id, :body)"),
                               {"id": row_id, "body": json.dumps(body)})
        await app.state.redis.enqueue_job("bench", row_id, _job_id=row_id,
                                          _queue_name="bench:queue")
        return {"id": row_id}

    return app


def pg_database() -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", 5432), 0.5):
            pass
        import psycopg

        name = f"loomis_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # noqa: BLE001 - any failure means: no PostgreSQL run
        print(f"PostgreSQL skipped: not reachable at {PG_ADMIN_URL} ({exc})")
        return None
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}"


def drop_pg_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def seed(database_url: str) -> tuple[str, str]:
    """A tenant with a key and succeeded jobs with two artifacts each, as a worker leaves them."""
    from datetime import timedelta

    from services.gateway.auth.service import provision_api_key
    from services.gateway.db.models import ApiKey, Artifact, Job, utcnow
    from services.gateway.db.session import make_engine, make_sessionmaker

    key = await provision_api_key(database_url=database_url, tenant_name="bench")
    engine = make_engine(database_url)
    try:
        async with make_sessionmaker(engine)() as session:
            from sqlalchemy import select

            tenant_id = (await session.scalar(select(ApiKey.tenant_id))) or ""
            now = utcnow()
            jobs = []
            for n in range(SEEDED_JOBS):
                job = Job(tenant_id=tenant_id, kind="generation", status="succeeded",
                          spec={**SPEC, "seed": n}, result={"timings": {"pipeline_s": 0.1}},
                          progress=1.0, last_seq=4, attempts=1, cancel_requested=False,
                          created_at=now - timedelta(seconds=SEEDED_JOBS - n),
                          started_at=now, finished_at=now)
                job.artifacts = [
                    Artifact(tenant_id=tenant_id, key=f"{tenant_id}/jobs/x{n}/0.png",
                             kind="image", index=0, content_type="image/png", size=4096,
                             sha256="0" * 64, width=64, height=64, seed=n),
                    Artifact(tenant_id=tenant_id, key=f"{tenant_id}/jobs/x{n}/manifest.json",
                             kind="manifest", content_type="application/json", size=512,
                             sha256="1" * 64),
                ]
                jobs.append(job)
            session.add_all(jobs)
            await session.commit()
            return key, jobs[-1].id
    finally:
        await engine.dispose()


POST_LUA = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (aiosqlite's too): on a shared machine
    req/s moves with the neighbours, CPU per request much less."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(url: str, *, seconds: int, connections: int, threads: int,
            headers: dict[str, str], body: dict[str, Any] | None, workdir: Path,
            server_pid: int | None = None) -> dict[str, float]:
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
            "--latency", "--timeout", "10s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    if body is not None:
        script = workdir / "post.lua"
        script.write_text(POST_LUA.format(body=json.dumps(body)))
        argv += ["-s", str(script)]
    cpu_before = cpu_seconds(server_pid) if server_pid else 0.0
    out = subprocess.run(argv + [url], capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(server_pid) - cpu_before if server_pid else 0.0
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def latency_ms(q: str) -> float:
        value, unit = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failed = re.search(r"Socket errors: .*", out)
    return {"rps": rps, "p50": latency_ms("50"), "p99": latency_ms("99"),
            "cpu_ms": 1000 * cpu / max(total, 1),
            "non2xx": float(errors.group(1)) if errors else 0.0,
            "socket_errors": 1.0 if failed else 0.0}


def bench_backend(name: str, database_url: str, *, s3_url: str, args: argparse.Namespace,
                  workdir: Path) -> list[tuple[str, dict[str, float]]]:
    key, job_id = asyncio.run(seed(database_url))
    redis_child, redis_url = start_redis(workdir / "redis")
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    env = {
        "LOOMIS_ENV": "test",
        "LOOMIS_LOG_LEVEL": "WARNING",
        "LOOMIS_DB__URL": database_url,
        "LOOMIS_STORAGE__BACKEND": "s3",
        "LOOMIS_STORAGE__ENDPOINT_URL": s3_url,
        "LOOMIS_STORAGE__BUCKET": bucket,
        "LOOMIS_STORAGE__ACCESS_KEY_ID": "test",
        "LOOMIS_STORAGE__SECRET_ACCESS_KEY": "test",
    }
    stack = Stack(data_dir=workdir / "stack", port=free_port(), redis_url=redis_url, env=env)
    baseline_port = free_port()
    baseline_env = {**stack.child_env(), "BENCH_JOB_ID": job_id, "BENCH_REDIS": redis_url}
    baseline_log = (workdir / "baseline.log").open("wb")
    baseline = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "gateway:create_baseline_app", "--factory",
         "--app-dir", str(ROOT / "bench"), "--host", "127.0.0.1", "--port", str(baseline_port),
         "--log-level", "warning"],
        env=baseline_env, cwd=ROOT, stdout=baseline_log, stderr=subprocess.STDOUT)
    results: list[tuple[str, dict[str, float]]] = []
    try:
        stack.start(own_redis=False, worker=False)
        wait_port(baseline_port)
        auth = {"Authorization": f"Bearer {key}"}
        gw, bl = stack.url, f"http://127.0.0.1:{baseline_port}"
        gateway_pid = stack.children[-1].popen.pid
        cases: list[tuple[str, str, dict[str, str], dict[str, Any] | None, int]] = [
            ("GET /healthz", f"{gw}/healthz", {}, None, gateway_pid),
            ("GET /v1/jobs/{id}", f"{gw}/v1/jobs/{job_id}", auth, None, gateway_pid),
            ("GET /v1/jobs", f"{gw}/v1/jobs", auth, None, gateway_pid),
            ("POST /v1/generations", f"{gw}/v1/generations", auth, SPEC, gateway_pid),
            ("baseline: one SQL read", f"{bl}/read", {}, None, baseline.pid),
            ("baseline: insert + enqueue", f"{bl}/write", {}, SPEC, baseline.pid),
        ]
        for label, url, headers, body, pid in cases:
            # a short warm-up: first requests pay connection set-up and lazy imports
            run_wrk(url, seconds=1, connections=args.connections, threads=args.threads,
                    headers=headers, body=body, workdir=workdir)
            figures = run_wrk(url, seconds=args.seconds, connections=args.connections,
                              threads=args.threads, headers=headers, body=body, workdir=workdir,
                              server_pid=pid)
            results.append((label, figures))
            print(f"  {name:8} {label:28} {figures['rps']:8.0f} req/s   p50 {figures['p50']:7.1f} ms"
                  f"   p99 {figures['p99']:7.1f} ms   server CPU {figures['cpu_ms']:5.2f} ms/req"
                  + (f"   NON-2xx {figures['non2xx']:.0f}" if figures["non2xx"] else ""),
                  flush=True)
    finally:
        stack.stop()
        baseline.terminate()
        baseline.wait(10)
        stop_child(redis_child)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="loomis-bench-gw-") as tmp:
        workdir = Path(tmp)
        moto_port = free_port()
        moto = Child("moto", subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
            stdout=(workdir / "moto.log").open("wb"), stderr=subprocess.STDOUT),
            workdir / "moto.log")
        all_results: dict[str, list[tuple[str, dict[str, float]]]] = {}
        try:
            wait_port(moto_port)
            s3_url = f"http://127.0.0.1:{moto_port}"
            print(f"wrk -c {args.connections} -t {args.threads} -d {args.seconds}s, "
                  f"{os.cpu_count()} CPUs", flush=True)
            if args.backend in ("sqlite", "both"):
                url = f"sqlite+aiosqlite:///{workdir / 'sqlite' / 'loomis.db'}"
                all_results["sqlite"] = bench_backend("sqlite", url, s3_url=s3_url, args=args,
                                                      workdir=workdir / "sqlite")
            if args.backend in ("postgres", "both"):
                pg = pg_database()
                if pg is not None:
                    try:
                        all_results["postgres"] = bench_backend(
                            "postgres", pg, s3_url=s3_url, args=args, workdir=workdir / "pg")
                    finally:
                        drop_pg_database(pg)
        finally:
            stop_child(moto)
    for backend, results in all_results.items():
        figures = dict(results)
        read, write = figures["baseline: one SQL read"], figures["baseline: insert + enqueue"]
        print(f"\n{backend}: gateway as a share of the bare FastAPI baseline (same run)")
        for label in ("GET /v1/jobs/{id}", "GET /v1/jobs"):
            print(f"  {label:24} {figures[label]['rps'] / read['rps']:6.2f} x one SQL read")
        print(f"  {'POST /v1/generations':24} "
              f"{figures['POST /v1/generations']['rps'] / write['rps']:6.2f} x insert + enqueue")
    return 0


if __name__ == "__main__":
    sys.exit(main())

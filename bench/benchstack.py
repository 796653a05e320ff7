"""The stack a benchmark runs against, started and stopped in one place.

SQLite, moto's S3 server over HTTP, a private redis-server, the gateway and the workers asked
for, with tiny models from ``model_cache``; an API key of a ``bench`` tenant. Every child is
stopped on the way out, and when the benchmark fails the children's last log lines are
printed first (a benchmark's failure is usually a child's).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.devstack import Child, Stack, free_port, start_redis, stop_child, wait_port


@dataclass(frozen=True)
class BenchStack:
    stack: Stack
    key: str
    database_url: str


@contextlib.contextmanager
def bench_stack(workdir: Path, *, model_cache: Path, log_level: str = "WARNING",
                env: dict[str, str] | None = None, **start: Any) -> Iterator[BenchStack]:
    """``start``: what ``Stack.start`` runs besides the gateway (``worker``, ``tagger``, …)."""
    from services.gateway.auth.service import provision_api_key

    database_url = f"sqlite+aiosqlite:///{workdir / 'loomis.db'}"
    key = asyncio.run(provision_api_key(database_url=database_url, tenant_name="bench"))
    moto_port = free_port()
    moto = Child("moto", subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
        stdout=(workdir / "moto.log").open("wb"), stderr=subprocess.STDOUT), workdir / "moto.log")
    redis_child, redis_url = start_redis(workdir / "redis")
    stack = Stack(data_dir=workdir / "stack", port=free_port(), redis_url=redis_url, env={
        "LOOMIS_ENV": "test",
        "LOOMIS_LOG_LEVEL": log_level,
        "LOOMIS_DB__URL": database_url,
        "LOOMIS_MODELS__CACHE_DIR": str(model_cache),
        "LOOMIS_STORAGE__BACKEND": "s3",
        "LOOMIS_STORAGE__ENDPOINT_URL": f"http://127.0.0.1:{moto_port}",
        "LOOMIS_STORAGE__BUCKET": f"bench-{uuid.uuid4().hex[:8]}",
        "LOOMIS_STORAGE__ACCESS_KEY_ID": "test",
        "LOOMIS_STORAGE__SECRET_ACCESS_KEY": "test",
        **(env or {}),
    })
    try:
        wait_port(moto_port)
        stack.start(own_redis=False, **start)
        yield BenchStack(stack=stack, key=key, database_url=database_url)
    except Exception:
        for child in stack.children:
            print(f"last lines of {child.name}'s log:\n{child.tail(40)}", file=sys.stderr)
        raise
    finally:
        stack.stop()
        stop_child(redis_child)
        stop_child(moto)

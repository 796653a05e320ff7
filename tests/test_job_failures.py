"""Errors that are not ours end a job with a code a client can act on and the job's kind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.jobrunner import run_job
from services.workerctx import CONTEXT_KEY, WorkerContext
from shared.events import JobEvents, decode_event
from shared.settings import get_settings
from shared.specs import JobStatus
from shared.storage import LocalStore
from tests.conftest import redis_server


class _PeftTooOld(ImportError):
    pass


@pytest.fixture
async def job_ctx(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """What a worker's ctx holds for run_job: events on a private real Redis, a local store,
    and one created job ``j``."""
    server = redis_server(tmp_path / "redis")
    redis = aioredis.Redis.from_url(server.url)
    try:
        events = JobEvents(redis, stream="events", maxlen=100, ttl_s=60)
        await events.create("j", tenant_id="t")
        store = LocalStore(tmp_path / "store")
        context = WorkerContext(settings=get_settings(), events=events, store=store, worker_name="w")
        # the typed context run_job reads, and its clients by name for the tests' own checks
        yield {CONTEXT_KEY: context, "events": events, "store": store, "redis": redis}
    finally:
        await redis.aclose()
        server.stop()


@pytest.mark.parametrize(("raised", "code", "words"), [
    (KeyError("latents"), "internal_error", "tagging failed unexpectedly (KeyError)"),
    (MemoryError(), "out_of_memory", "tagging ran out of memory"),
    (_PeftTooOld("no", name="peft"), "dependency_unavailable", "lacks a package it needs"),
])
async def test_a_foreign_error_fails_the_job_with_a_code_and_its_kind(
    job_ctx: dict[str, Any], raised: Exception, code: str, words: str,
) -> None:
    events: JobEvents = job_ctx["events"]

    async def body(_queued_s: float) -> dict[str, Any]:
        raise raised

    outcome = await run_job(job_ctx, job_id="j", cleanup_prefix="tmp/j/", timeout_s=10,
                            max_tries=2, log_extra={}, body=body, kind="tagging")
    assert outcome == {"status": "failed"}
    assert await events.state("j") is JobStatus.FAILED
    last = decode_event((await job_ctx["redis"].xrange("events"))[-1][1])
    assert last.data["error"]["code"] == code
    assert words in last.data["error"]["message"]
    assert "generation" not in last.data["error"]["message"]


async def test_a_redis_outage_inside_a_job_retries_it_instead_of_failing(
    job_ctx: dict[str, Any],
) -> None:
    """An outage longer than the client's retries must not turn into a failed job."""
    from arq import Retry
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def body(_queued_s: float) -> dict[str, Any]:
        raise RedisConnectionError("Connection refused")

    with pytest.raises(Retry):
        await run_job(job_ctx, job_id="j", cleanup_prefix="tmp/j/", timeout_s=10,
                      max_tries=3, log_extra={}, body=body, kind="training")
    assert await job_ctx["events"].state("j") is JobStatus.RUNNING, "not failed: it will be re-run"

"""Many clients at once: every submission and read answers, none with a 500.

Concurrent writers on SQLite meet its single write lock; a transaction that read first and
then writes while another connection committed can be refused at once ("database is
locked"), whatever the busy timeout. Under load that surfaced as a 500 on a submission.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from tests.conftest import RunningStack

CONCURRENCY = 32


async def _burst(stack: RunningStack) -> tuple[Counter[int], list[str]]:
    headers = {"Authorization": f"Bearer {stack.keys['alice']}"}
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=120,
                                 limits=limits) as client:
        async def submit(index: int) -> httpx.Response:
            return await client.post("/v1/generations", json={
                "prompt": f"burst {index}", "width": 64, "height": 64, "steps": 1},
                headers={"Idempotency-Key": f"burst-{stack.url}-{index}"} if index % 2 else {})

        submitted = await asyncio.gather(*(submit(i) for i in range(CONCURRENCY * 2)))
        ids = [r.json()["id"] for r in submitted if r.status_code == 202]
        reads = await asyncio.gather(*(client.get(f"/v1/jobs/{job_id}") for job_id in ids),
                                     client.get("/v1/jobs"), *(client.get(f"/v1/jobs/{job_id}")
                                                               for job_id in ids))
    statuses = Counter(r.status_code for r in [*submitted, *reads])
    problems = [r.text[:300] for r in [*submitted, *reads] if r.status_code >= 500]
    return statuses, problems


@pytest.mark.parametrize("stack", ["sqlite", "postgres"], indirect=True)
def test_a_burst_of_submissions_and_reads_never_fails(stack: RunningStack) -> None:
    statuses, problems = asyncio.run(_burst(stack))
    assert problems == [], problems
    assert statuses[202] == CONCURRENCY * 2 and statuses[200] == CONCURRENCY * 4 + 1, statuses

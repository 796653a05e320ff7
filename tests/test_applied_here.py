"""A gateway's consumer skips the ``queued`` events its own submissions already committed."""

from __future__ import annotations

import httpx
import pytest

from services.gateway.events.consumer import AppliedHere
from tests.conftest import RunningStack, wait_terminal


def test_an_event_is_skipped_once_and_the_memory_is_bounded() -> None:
    applied = AppliedHere(limit=2)
    applied.add("a", 1)
    assert applied.take("a", 1) and not applied.take("a", 1)  # met once, then forgotten
    assert not applied.take("a", 2)
    for seq in range(3):
        applied.add("b", seq)
    assert not applied.take("b", 0)  # the oldest forgotten: applying it again is harmless
    assert applied.take("b", 1) and applied.take("b", 2)


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_a_submitted_job_still_records_every_event_once(stack: RunningStack) -> None:
    with stack.client() as client:
        job_id = client.post("/v1/generations", json={
            "prompt": "applied here", "width": 64, "height": 64, "steps": 1}).json()["id"]
        job = wait_terminal(client, job_id, timeout=120)
        assert job["status"] == "succeeded", job
        with httpx.stream("GET", f"{stack.url}/v1/jobs/{job_id}/events", timeout=30,
                          headers=client.headers) as response:
            lines = [line for line in response.iter_lines() if line.startswith("event:")]
    events = [line.split(":", 1)[1].strip() for line in lines]
    assert events[0] == "queued" and events.count("queued") == 1, events
    assert events[-1] == "succeeded" and "running" in events, events

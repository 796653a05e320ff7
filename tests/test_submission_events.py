"""A submission leaves its ``queued`` event to the event consumer: it is recorded once, first."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import RunningStack, wait_terminal


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

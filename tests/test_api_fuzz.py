"""Schemathesis against the real gateway: every operation of the published OpenAPI, valid and
invalid inputs alike, must answer without a 5xx and with a body its schema describes.

Kept small (a few examples per operation and mode) so it stays a smoke test in every run.
At scale, set LOOMIS_FUZZ_EXAMPLES, or point schemathesis' CLI at a running gateway:
`schemathesis run http://127.0.0.1:8000/openapi.json -H "Authorization: Bearer $KEY"
-c not_a_server_error,response_schema_conformance -n 200` — thousands of requests, which is
how the empty Idempotency-Key, the overflowing Last-Event-ID and the naive timestamps were
found.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import RunningStack, create_key

EXAMPLES = int(os.environ.get("LOOMIS_FUZZ_EXAMPLES", "3"))


@pytest.fixture
def fuzz_key(stack: RunningStack) -> Iterator[str]:
    """A tenant of its own, so the jobs fuzzing submits touch no other test's listings; they
    are canceled afterwards so the shared workers do not spend the session rendering them."""
    key = stack.keys.get("fuzz") or create_key(stack.database_url, "fuzz")
    stack.keys["fuzz"] = key
    yield key
    with stack.client("fuzz") as client:
        for status in ("queued", "running"):
            page = client.get("/v1/jobs", params={"status": status, "limit": 100}).json()
            for job in page["items"]:
                client.post(f"/v1/jobs/{job['id']}/cancel")


def test_every_operation_answers_in_schema_and_never_5xx(
    stack: RunningStack, fuzz_key: str
) -> None:
    # Per operation and mode rather than schemathesis' pytest plugin, whose lazy fixture
    # loader relies on pytest internals that pytest 9 no longer has.
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    headers = {"Authorization": f"Bearer {fuzz_key}"}
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def call(case: schemathesis.Case) -> None:
                case.call_and_validate(headers=headers, timeout=30,
                                       checks=[not_a_server_error, response_schema_conformance])

            try:
                call()
            except Unsatisfiable:
                pass  # no parameters to make invalid (GET /healthz): nothing negative to send
            except Exception as exc:  # every operation gets its turn; report them together
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)

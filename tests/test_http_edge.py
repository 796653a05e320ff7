"""The HTTP edge: headers, media types, methods and timestamps are answered as HTTP says,
with problem+json naming what was wrong, never a 500 (each of these was a 500 or off-spec)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from httpx_sse import connect_sse

from tests.conftest import RunningStack, wait_terminal
from tests.test_datasets_e2e import kohya_zip

SMALL = {"prompt": "a red fox in snow", "model": "tiny-sd15", "steps": 2, "width": 64,
         "height": 64}
JOB_ENDPOINTS = ("/v1/generations", "/v1/sweeps", "/v1/taggings", "/v1/trainings")


def _problem(response: httpx.Response, status: int, code: str) -> dict:  # type: ignore[type-arg]
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status and problem["code"] == code, problem
    return problem  # type: ignore[no-any-return]


def _utc(value: str) -> datetime:
    """An RFC 3339 date-time must carry its offset; ours is always UTC."""
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0), value
    return parsed


@pytest.mark.parametrize("key", ["", "x" * 201, "tab\there", "caf\u00e9"])
def test_a_malformed_idempotency_key_is_a_400_on_every_job_endpoint(
    stack: RunningStack, key: str
) -> None:
    """An empty key used to be stored as "", so the tenant's second empty key hit the unique
    constraint: a 500 on every job endpoint."""
    with stack.client("bob") as client:
        for path in JOB_ENDPOINTS:
            body = SMALL if path == "/v1/generations" else {}
            for _ in range(2):
                response = client.post(path, json=body,
                                       headers={"Idempotency-Key": key.encode("latin-1")})
                problem = _problem(response, 400, "invalid_idempotency_key")
                assert [e["field"] for e in problem["errors"]] == ["header.Idempotency-Key"]
        # The header is checked after the key: a stranger learns nothing from it.
        anonymous = httpx.post(f"{stack.url}/v1/generations", json=SMALL,
                               headers={"Idempotency-Key": ""})
        assert anonymous.status_code == 401
        # A well-formed key still deduplicates.
        first = client.post("/v1/generations", json=SMALL, headers={"Idempotency-Key": "a b-1"})
        again = client.post("/v1/generations", json=SMALL, headers={"Idempotency-Key": "a b-1"})
        assert first.status_code == again.status_code == 202
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["idempotent-replayed"] == "true"
        wait_terminal(client, first.json()["id"])


def test_last_event_id_out_of_range_is_a_422_and_in_range_resumes(stack: RunningStack) -> None:
    with stack.client() as client:
        job = client.post("/v1/generations", json=SMALL).json()
        wait_terminal(client, job["id"])
        for value in (str(2**63), str(2**31), "-1", "abc", "1.5"):
            response = client.get(f"/v1/jobs/{job['id']}/events",
                                  headers={"Last-Event-ID": value})
            problem = _problem(response, 422, "validation_error")
            assert [e["field"] for e in problem["errors"]] == ["header.Last-Event-ID"], value
        with connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events",
                         headers={"Last-Event-ID": str(2**31 - 1)}) as source:
            assert source.response.status_code == 200
            assert list(source.iter_sse()) == []  # nothing comes after the largest id
        with connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events",
                         headers={"Last-Event-ID": "1"}) as source:
            events = [json.loads(sse.data) for sse in source.iter_sse()]
    assert events[0]["seq"] == 2 and events[-1]["type"] == "succeeded"
    for event in events:
        _utc(event["at"])


def test_every_timestamp_in_a_response_is_utc_with_an_offset(stack: RunningStack) -> None:
    """SQLite returns naive datetimes: jobs, LoRAs and datasets read back from it printed
    `2026-01-01T12:00:00.123456` (not RFC 3339) while fresh POST responses had a `Z`."""
    before = datetime.now(UTC) - timedelta(seconds=5)
    with stack.client() as client:
        posted = client.post("/v1/generations", json=SMALL).json()
        job = wait_terminal(client, posted["id"])
        assert job["status"] == "succeeded", job
        listed = next(item for item in client.get("/v1/jobs", params={"limit": 100}).json()
                      ["items"] if item["id"] == job["id"])
        for shown in (posted, job, listed):
            _utc(shown["created_at"])
        for shown in (job, listed):
            started, finished = _utc(shown["started_at"]), _utc(shown["finished_at"])
            assert before <= _utc(shown["created_at"]) <= started <= finished
        # The cursor built from a timestamp read back still pages.
        page = client.get("/v1/jobs", params={"limit": 1}).json()
        assert client.get("/v1/jobs", params={"limit": 1, "cursor": page["next_cursor"]}
                          ).status_code == 200

        created = client.post("/v1/datasets", data={"name": "utc"},
                              files=[("zip", ("d.zip", kohya_zip(), "application/zip"))])
        assert created.status_code == 201, created.text
        dataset_id = created.json()["id"]
        shown_dataset = client.get(f"/v1/datasets/{dataset_id}").json()
        listed_dataset = next(d for d in client.get("/v1/datasets").json()["items"]
                              if d["id"] == dataset_id)
        for shown in (created.json(), shown_dataset, listed_dataset):
            assert before <= _utc(shown["created_at"])
        client.delete(f"/v1/datasets/{dataset_id}")


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PUT", "/v1/loras/some-id", "GET, DELETE"),
    ("POST", "/v1/loras/some-id", "GET, DELETE"),
    ("PUT", "/v1/loras", "GET, POST"),
    ("DELETE", "/v1/jobs/some-id", "GET"),
    ("GET", "/v1/datasets/d/items/i", "PATCH"),
    ("DELETE", "/v1/generations", "POST"),
])
def test_405_allow_lists_every_method_of_the_path(
    stack: RunningStack, method: str, path: str, allowed: str
) -> None:
    with stack.client() as client:
        response = client.request(method, path)
    _problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == allowed


@pytest.mark.parametrize(("content", "content_type"), [
    (json.dumps(SMALL).encode(), "text/plain"),
    (b"prompt=a+fox&steps=2", "application/x-www-form-urlencoded"),
    (json.dumps(SMALL).encode(), None),
])
def test_a_body_that_is_not_json_is_a_415(
    stack: RunningStack, content: bytes, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    with stack.client("bob") as client:
        # Ids only: presigned URLs in the items are minted afresh on every GET.
        before = [j["id"] for j in client.get("/v1/jobs", params={"limit": 100}).json()["items"]]
        response = client.post("/v1/generations", content=content, headers=headers)
        problem = _problem(response, 415, "unsupported_media_type")
        assert [e["field"] for e in problem["errors"]] == ["header.Content-Type"]
        assert response.headers["accept-post"] == "application/json"
        patch = client.patch("/v1/datasets/d/items/i", content=b'{"caption": "x"}',
                             headers={"content-type": "text/plain"})
        _problem(patch, 415, "unsupported_media_type")
        assert [j["id"] for j in client.get("/v1/jobs", params={"limit": 100}).json()["items"]] == before
        # JSON types other than application/json are JSON; an empty body is still "missing".
        merge = client.post("/v1/generations", content=json.dumps({**SMALL, "steps": 0}),
                            headers={"content-type": "application/merge-patch+json"})
        assert merge.status_code == 422 and merge.json()["errors"][0]["field"] == "steps"
        empty = client.post("/v1/generations")
        assert empty.status_code == 422 and empty.json()["errors"][0]["field"] == "body"


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/generations", '{"prompt": "x", "guidance_scale": NaN}', "guidance_scale"),
    ("/v1/generations", '{"prompt": "x", "guidance_scale": Infinity}', "guidance_scale"),
    ("/v1/generations", '{"prompt": "x", "guidance_scale": -Infinity}', "guidance_scale"),
    ("/v1/generations", '{"prompt": "x", "guidance_scale": 1e999}', "guidance_scale"),
    ("/v1/generations", '{"prompt": "x", "loras": [{"id": "l", "weight": NaN}]}',
     "loras.0.weight"),
    ("/v1/generations", '{"prompt": "x", "mode": "inpaint", "init_image": "upload:0123456789abcdef",'
     ' "mask": {"shapes": [{"type": "rect", "x": NaN, "y": 0, "width": 8, "height": 8}]}}',
     "mask.shapes.0.rect.x"),
    ("/v1/sweeps", '{"base": {"prompt": "x"}, "axes": [{"param": "guidance_scale",'
     ' "values": [1, NaN]}]}', "axes.0.values.1"),
    ("/v1/trainings", '{"dataset_id": "d", "optim": {"learning_rate": NaN}}',
     "optim.learning_rate"),
])
def test_non_finite_numbers_are_refused_naming_the_field(
    stack: RunningStack, path: str, body: str, field: str
) -> None:
    """Python's JSON parser takes NaN and Infinity (not JSON) and 1e999 (infinity)."""
    with stack.client("bob") as client:
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    problem = _problem(response, 422, "validation_error")
    refused = [e for e in problem["errors"] if e["type"] == "finite_number"]
    assert refused and all(e["field"].startswith(field) for e in refused), problem
    assert "finite number" in refused[0]["message"]


def test_a_boolean_is_not_a_sweep_value(stack: RunningStack) -> None:
    """`values: [false]` on a seed axis was accepted as seed 0 (the schema says number or
    string; schemathesis found it)."""
    with stack.client("bob") as client:
        response = client.post("/v1/sweeps", json={
            "base": SMALL, "axes": [{"param": "seed", "values": [1, False]}]})
    problem = _problem(response, 422, "validation_error")
    assert {e["field"].rsplit(".", 1)[0] for e in problem["errors"]} == {"axes.0.values.1"}


@pytest.mark.parametrize("decoded", [
    ["2026-01-01T00:00:00", "\u0000"],          # NUL reaches PostgreSQL: was a 500
    ["0001-01-01T00:00:00+01:00", "x"],         # overflows in UTC: was a 500
    ["9999-12-31T23:59:59-01:00", "x"],
    ["2026-01-01T00:00:00", ["x"]],
    [1, 2],
])
def test_a_forged_jobs_cursor_is_a_400(stack: RunningStack, decoded: list) -> None:  # type: ignore[type-arg]
    cursor = base64.urlsafe_b64encode(json.dumps(decoded).encode()).decode().rstrip("=")
    with stack.client("bob") as client:
        response = client.get("/v1/jobs", params={"cursor": cursor})
    _problem(response, 400, "invalid_cursor")


@pytest.mark.parametrize(("body", "fields"), [
    ({**SMALL, "mode": "img2img"}, {"init_image"}),
    ({**SMALL, "init_image": "upload:0123456789abcdef", "strength": 0.5},
     {"init_image", "strength"}),
    ({**SMALL, "loras": [{"id": "a"}, {"id": "b"}, {"id": "a"}]}, {"loras.2.id"}),
])
def test_a_mode_error_names_its_field_not_the_body(
    stack: RunningStack, body: dict, fields: set[str]  # type: ignore[type-arg]
) -> None:
    """Schemathesis' valid-looking requests were refused at `body`, hiding which field."""
    with stack.client("bob") as client:
        response = client.post("/v1/generations", json=body)
        sweep = client.post("/v1/sweeps", json={
            "base": body, "axes": [{"param": "seed", "values": [1, 2]}]})
    problem = _problem(response, 422, "validation_error")
    assert {e["field"] for e in problem["errors"]} == fields
    assert {e["field"] for e in _problem(sweep, 422, "validation_error")["errors"]} == {
        f"base.{field}" for field in fields}


@pytest.mark.parametrize("content", [
    b'{"prompt": "\xff\xfe"}',                                   # not UTF-8
    b'{"prompt": "x", "controls": [{"type": "openpose", "keypoints": {"a": '
    + b"[" * 100_000 + b"]" * 100_000 + b"}}]}",                # deeper than the parser goes
])
def test_json_the_parser_cannot_read_is_a_400_malformed_json(
    stack: RunningStack, content: bytes
) -> None:
    """These were 400 `http_error` "There was an error parsing the body", unlike every other
    malformed body."""
    with stack.client("bob") as client:
        response = client.post("/v1/generations", content=content,
                               headers={"content-type": "application/json"})
    problem = _problem(response, 400, "malformed_json")
    assert [e["field"] for e in problem["errors"]] == ["body"]


def test_a_body_over_the_limit_is_a_413_naming_body_before_it_is_read(
        stack: RunningStack) -> None:
    """JSON bodies are read whole: one far over LOOMIS_GATEWAY__MAX_BODY_BYTES (64 MiB) is
    refused as it arrives, in the shape of the API it was sent to, and nothing is queued."""
    import socket
    from urllib.parse import urlparse

    key = stack.keys["alice"]
    url = urlparse(stack.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as raw:
        raw.sendall(f"POST /v1/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}"
                    "\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\n\r\n{"
                    .encode())
        head = b""  # answered, and closed, without the 1 GB it claims to send
        while chunk := raw.recv(65536):
            head += chunk
    head = head.decode()
    assert head.startswith("HTTP/1.1 413"), head
    assert '"field":"body"' in head and "999999999 bytes" in head

    def streamed() -> object:  # chunked, no Content-Length: counted as it streams
        yield b'{"prompt": "'
        for _ in range(65):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with stack.client() as client:
        before = [job["id"] for job in client.get("/v1/jobs").json()["items"]]
        problem = _problem(httpx.post(f"{stack.url}/v1/generations", content=streamed(),
                                      headers=headers), 413, "payload_too_large")
        assert problem["errors"][0]["field"] == "body"
        webui = httpx.post(f"{stack.url}/sdapi/v1/txt2img", content=streamed(), headers=headers)
        assert webui.status_code == 413 and "body" in webui.json()["detail"]
        openai = httpx.post(f"{stack.url}/v1/images/generations", content=streamed(),
                            headers=headers)
        # OpenAI answers every invalid request with a 400
        assert openai.status_code == 400 and openai.json()["error"]["param"] == "body"
        # no job was made (ids only: an earlier test's job may still be finishing)
        assert [job["id"] for job in client.get("/v1/jobs").json()["items"]] == before
        assert client.post("/v1/generations", json=SMALL).status_code == 202  # still serving

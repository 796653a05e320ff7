"""Webhook delivery with a real stack and real receivers on loopback: every delivery verifies
with `standardwebhooks`, retries keep their `webhook-id`, and the delivery log says what
happened. The stack allows http and private networks (loopback receivers) and retries in
fractions of a second instead of days.
"""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from standardwebhooks import Webhook, WebhookVerificationError

from services.devstack import free_port, stop_child
from tests.conftest import (
    RunningStack,
    S3Server,
    fresh_pg_database,
    launch_stack,
    wait_terminal,
)

SPEC = {"prompt": "a webhook fox", "model": "tiny-sd15", "steps": 1, "width": 64, "height": 64}
WEBHOOK_ENV = {
    "LOOMIS_WEBHOOKS__ALLOW_HTTP": "true",
    "LOOMIS_WEBHOOKS__ALLOW_PRIVATE_NETWORKS": "true",
    "LOOMIS_WEBHOOKS__RETRY_SCHEDULE_S": "[0, 0.3, 0.3, 4]",
    "LOOMIS_WEBHOOKS__RETRY_JITTER": "0",
    "LOOMIS_WEBHOOKS__DISPATCH_INTERVAL_S": "0.1",
    "LOOMIS_WEBHOOKS__TIMEOUT_S": "1",
}


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records what it is sent and answers from a script
    (status codes, then 200 for ever; a float is a delay before answering 200)."""

    port: int = field(default_factory=free_port)
    script: list[Any] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.received.append(Received(dict(self.headers.items()), body,
                                                  time.monotonic()))
                answer = receiver.script.pop(0) if receiver.script else 200
                if isinstance(answer, float):
                    time.sleep(answer)
                    answer = 200
                self.send_response(answer)
                for name, value in receiver.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def wait(self, count: int, timeout: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.received) >= count, (count, [r.headers for r in self.received])
        return self.received


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def hooks_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                s3_server: S3Server, model_cache: Path) -> Iterator[RunningStack]:
    """On PostgreSQL the dispatchers claim with FOR UPDATE SKIP LOCKED; on SQLite with a
    conditional UPDATE: the same tests hold both to the same guarantees."""
    tmp = tmp_path_factory.mktemp(f"hooks-{request.param}")
    databases = fresh_pg_database() if request.param == "postgres" else None
    database_url = (next(databases) if databases is not None
                    else f"sqlite+aiosqlite:///{tmp / 'loomis.db'}")
    running = launch_stack(tmp, database_url=database_url,
                           s3=s3_server, model_cache=model_cache, extra_env=WEBHOOK_ENV,
                           tagger=True, trainer=True)
    yield running
    running.stack.stop()
    running.redis.stop()
    if databases is not None:
        next(databases, None)  # drops it


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


def endpoint(client: httpx.Client, url: str, events: list[str] | None = None) -> dict[str, Any]:
    created = client.post("/v1/webhooks", json={"url": url, **({"events": events} if events
                                                                else {})})
    assert created.status_code == 201, created.text
    return created.json()  # type: ignore[no-any-return]


def verify(secret: str, received: Received) -> dict[str, Any]:
    return Webhook(secret).verify(received.body, received.headers)  # type: ignore[no-any-return]


def test_a_job_notifies_its_endpoint_and_its_own_webhook(hooks_stack: RunningStack,
                                                         receiver: Receiver) -> None:
    with hooks_stack.client() as client:
        hook = endpoint(client, receiver.url, ["generation.succeeded"])
        job_secret = client.get("/v1/webhooks/job-secret").json()["secret"]
        job = client.post("/v1/generations", json={**SPEC, "webhook": {"url": receiver.url}})
        assert job.status_code == 202, job.text
        wait_terminal(client, job.json()["id"])
        received = receiver.wait(2)
        client.delete(f"/v1/webhooks/{hook['id']}")
    by_secret = []
    for message in received[:2]:
        for secret in (hook["secret"], job_secret):
            try:
                by_secret.append((secret, verify(secret, message)))
            except Exception:
                continue
    assert {secret for secret, _ in by_secret} == {hook["secret"], job_secret}
    for _, payload in by_secret:
        assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job.json()["id"]
        assert payload["seq"] >= 3 and payload["data"]["status"] == "succeeded"
        image = next(a for a in payload["data"]["artifacts"] if a["kind"] == "image")
        assert httpx.get(image["url"]).status_code == 200
    assert "secret" not in json.dumps(client_listing(hooks_stack))


def _one_image_dataset(client: httpx.Client) -> str:
    buffer, image = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image, format="PNG")
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("img/1_sks dog/0.png", image.getvalue())
        archive.writestr("img/1_sks dog/0.caption", "a red square, rating:general")
    created = client.post("/v1/datasets", data={"name": "hooked", "min_side": "64"},
                          files=[("zip", ("d.zip", buffer.getvalue(), "application/zip"))])
    assert created.status_code == 201, created.text
    return created.json()["id"]  # type: ignore[no-any-return]


def _without_urls(job: dict[str, Any]) -> dict[str, Any]:
    """A job as GET shows it, less the presigned URLs (each view signs its own)."""
    return {**job, "artifacts": [{k: v for k, v in a.items() if k != "url"}
                                 for a in job["artifacts"]]}


def test_a_tagging_and_a_training_notify_their_endpoint_and_their_own_webhooks(
        hooks_stack: RunningStack, receiver: Receiver) -> None:
    """The cheapest job of each kind (cleaning only, no model; one training step on one
    64 px image): each success reaches the tenant's endpoint, signed with its secret, and the
    job's own webhook, signed with the tenant's job secret, carrying the job as GET shows it."""
    with hooks_stack.client() as client:
        hook = endpoint(client, receiver.url, ["tagging.succeeded", "training.succeeded"])
        job_secret = client.get("/v1/webhooks/job-secret").json()["secret"]
        dataset_id = _one_image_dataset(client)
        own = {"webhook": {"url": receiver.url}}
        submitted = [
            client.post("/v1/taggings", json={"dataset_id": dataset_id, "caption": None,
                                              "tags": None, "clean": {}, **own}),
            client.post("/v1/trainings", json={
                "name": "hooked", "dataset_id": dataset_id, "network": {"rank": 1},
                "data": {"resolution": 64, "enable_bucket": False},
                "optim": {"max_train_steps": 1, "seed": 1}, **own}),
        ]
        assert [r.status_code for r in submitted] == [202, 202], [r.text for r in submitted]
        jobs = [r.json()["id"] for r in submitted]
        for job_id in jobs:
            wait_terminal(client, job_id, timeout=120)
        received = receiver.wait(4)
        time.sleep(0.3)  # a fifth delivery (a duplicate, another event) would be here by now
        assert len(receiver.received) == 4, [r.headers for r in receiver.received]
        views = {job_id: client.get(f"/v1/jobs/{job_id}").json() for job_id in jobs}
        client.delete(f"/v1/webhooks/{hook['id']}")
    assert {job["kind"]: job["status"] for job in views.values()} == {
        "tagging": "succeeded", "training": "succeeded"}, views
    targets = set()
    for message in received:
        to_endpoint = message.headers["webhook-id"].endswith(f"_{hook['id']}")
        secret, other = ((hook["secret"], job_secret) if to_endpoint
                         else (job_secret, hook["secret"]))
        payload = verify(secret, message)
        with pytest.raises(WebhookVerificationError):
            verify(other, message)
        data = payload["data"]
        targets.add((data["id"], to_endpoint))
        assert payload["type"] == "job.succeeded" and payload["seq"] >= 3
        assert _without_urls(data) == _without_urls(views[data["id"]])
        assert data["artifacts"], data
        for artifact in data["artifacts"]:
            assert httpx.get(artifact["url"]).status_code == 200, artifact
    assert targets == {(job_id, to_endpoint) for job_id in jobs for to_endpoint in (True, False)}
    kinds = {view["kind"]: {a["kind"] for a in view["artifacts"]} for view in views.values()}
    assert kinds["tagging"] >= {"metadata", "results"} and "lora" in kinds["training"], kinds


def client_listing(stack: RunningStack) -> Any:
    with stack.client() as client:
        return client.get("/v1/webhooks").json()


def test_failures_are_retried_with_the_same_id_and_logged(hooks_stack: RunningStack,
                                                          receiver: Receiver) -> None:
    receiver.script = [500, 500, 200]
    with hooks_stack.client() as client:
        hook = endpoint(client, receiver.url)
        ping = client.post(f"/v1/webhooks/{hook['id']}/test")
        assert ping.status_code == 202, ping.text
        received = receiver.wait(3)
        assert len({r.headers["webhook-id"] for r in received}) == 1
        for message in received:
            verify(hook["secret"], message)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            log = client.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["items"]
            if log and log[0]["status"] == "succeeded":
                break
            time.sleep(0.1)
        attempts = log[0]["attempts"]
        assert [a["status_code"] for a in attempts] in ([500, 500, 200], [200, 500, 500])
        redo = client.post(f"/v1/webhooks/{hook['id']}/deliveries/{log[0]['id']}/redeliver")
        assert redo.status_code == 202, redo.text
        again = receiver.wait(4)
        assert again[3].headers["webhook-id"] == received[0].headers["webhook-id"]
        client.delete(f"/v1/webhooks/{hook['id']}")


def test_410_disables_429_waits_3xx_and_timeouts_fail(hooks_stack: RunningStack,
                                                      receiver: Receiver) -> None:
    with hooks_stack.client() as client:
        gone = endpoint(client, receiver.url)
        receiver.script = [410]
        client.post(f"/v1/webhooks/{gone['id']}/test")
        receiver.wait(1)
        deadline = time.monotonic() + 10
        while client.get(f"/v1/webhooks/{gone['id']}").json()["enabled"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "410" in (client.get(f"/v1/webhooks/{gone['id']}").json()["disabled_reason"] or "")
        client.delete(f"/v1/webhooks/{gone['id']}")

        busy = endpoint(client, receiver.url)
        receiver.received.clear()
        receiver.script, receiver.headers = [429], {"Retry-After": "2"}
        client.post(f"/v1/webhooks/{busy['id']}/test")
        first, second = receiver.wait(2, timeout=30)[:2]
        assert second.at - first.at >= 2.0
        receiver.headers = {}
        client.delete(f"/v1/webhooks/{busy['id']}")

        moved = endpoint(client, receiver.url)
        receiver.received.clear()
        receiver.script = [302, 2.5, 200]  # a redirect, then slower than the 1 s timeout
        client.post(f"/v1/webhooks/{moved['id']}/test")
        receiver.wait(3, timeout=30)
        deadline = time.monotonic() + 10
        while True:
            log = client.get(f"/v1/webhooks/{moved['id']}/deliveries").json()["items"][0]
            if log["status"] == "succeeded" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        codes = [a["status_code"] for a in log["attempts"]]
        errors = [a["error"] or "" for a in log["attempts"]]
        assert 302 in codes and any("timeout" in e for e in errors) and 200 in codes, log
        client.delete(f"/v1/webhooks/{moved['id']}")


def _restart_gateway(stack: RunningStack, *, down_s: float = 0.0) -> None:
    gateway = next(c for c in stack.stack.children if c.name == "gateway")
    stop_child(gateway)
    stack.stack.children.remove(gateway)
    time.sleep(down_s)
    stack.stack.start_gateway()
    stack.stack.wait_ready()


def test_a_delivery_survives_a_receiver_down_and_a_gateway_restart(
        hooks_stack: RunningStack) -> None:
    """Three quick attempts fail (nobody listens), the fourth is due 4 s later: the gateway
    is down then and the receiver comes up; the restarted gateway sends it from SQL."""
    port = free_port()
    with hooks_stack.client() as client:
        hook = endpoint(client, f"http://127.0.0.1:{port}/hook")
        assert client.post(f"/v1/webhooks/{hook['id']}/test").status_code == 202
        time.sleep(1.0)
        late = Receiver(port=port).start()
        try:
            _restart_gateway(hooks_stack, down_s=0.5)
            message = late.wait(1, timeout=30)[0]
            assert verify(hook["secret"], message)["type"] == "ping"
        finally:
            late.stop()
        log = client.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["items"][0]
        assert log["status"] == "succeeded" and len(log["attempts"]) == 4, log
        client.delete(f"/v1/webhooks/{hook['id']}")


def test_two_gateways_deliver_every_event_exactly_once(hooks_stack: RunningStack,
                                                       receiver: Receiver) -> None:
    import subprocess
    import sys

    from services.devstack import Child, wait_port

    port = free_port()
    log = hooks_stack.stack.data_dir / "logs" / "gateway-2.log"
    second = Child("gateway-2", subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "services.gateway.app:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=hooks_stack.stack.child_env(), stdout=log.open("wb"), stderr=subprocess.STDOUT), log)
    try:
        wait_port(port)
        with hooks_stack.client() as client:
            hook = endpoint(client, receiver.url)
            for _ in range(30):
                assert client.post(f"/v1/webhooks/{hook['id']}/test").status_code == 202
            received = receiver.wait(30)
            time.sleep(2)  # anything sent twice would have arrived by now
            ids = [r.headers["webhook-id"] for r in receiver.received]
            assert len(ids) == 30 and len(set(ids)) == 30
            client.delete(f"/v1/webhooks/{hook['id']}")
        assert all(verify(hook["secret"], r) for r in received)
    finally:
        stop_child(second)


def test_both_secrets_verify_during_a_rotation(hooks_stack: RunningStack,
                                               receiver: Receiver) -> None:
    with hooks_stack.client() as client:
        hook = endpoint(client, receiver.url)
        rotated = client.post(f"/v1/webhooks/{hook['id']}/rotate-secret").json()
        client.post(f"/v1/webhooks/{hook['id']}/test")
        message = receiver.wait(1)[0]
        assert verify(hook["secret"], message) == verify(rotated["secret"], message)
        assert len(message.headers["webhook-signature"].split()) == 2
        client.delete(f"/v1/webhooks/{hook['id']}")


def test_a_jobs_own_webhook_is_signed_even_before_the_secret_was_read(
        hooks_stack: RunningStack, receiver: Receiver) -> None:
    """The job secret is made on first use: by the first delivery, if nobody asked for it."""
    with hooks_stack.client("bob") as client:
        job = client.post("/v1/generations", json={**SPEC, "webhook": {"url": receiver.url}})
        assert job.status_code == 202, job.text
        message = receiver.wait(1)[0]
        secret = client.get("/v1/webhooks/job-secret").json()["secret"]
    assert verify(secret, message)["data"]["id"] == job.json()["id"]

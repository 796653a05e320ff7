"""The webhooks API over HTTP: endpoints and their secrets, per-job webhooks on every job
endpoint, the deliveries job events queue, and tenancy.

Sending is the dispatcher's (its own tests); here a delivery is a row. Once a dispatcher runs
in the stack, a row may already have been tried (at a loopback port where nothing listens),
so a fresh delivery is "pending, or pending once and tried since".
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text, update

from services.gateway.db.models import (
    Job,
    Tenant,
    WebhookDelivery,
    WebhookEndpoint,
    new_id,
)
from services.gateway.db.session import make_engine, make_sessionmaker, migrate
from services.gateway.jobs.service import apply_event
from services.gateway.jobs.submission import request_hash
from services.gateway.webhooks.service import filter_matches
from shared.events import JobEvent
from shared.specs import GenerationSpec, GenerationTask, JobStatus, SweepSpec
from tests.conftest import RunningStack, S3Server, create_key, launch_stack, wait_terminal
from tests.test_scenes_e2e import catalog
from tests.test_trainings_e2e import events_of, training_zip

SMALL = {"prompt": "a red fox in snow", "model": "tiny-sd15", "steps": 2, "width": 64,
         "height": 64}
HOOK = "http://127.0.0.1:9/hook"  # the discard port: nothing answers there


def _tenant_client(stack: RunningStack) -> httpx.Client:
    """A client of a tenant of its own, so its endpoints see only its own jobs."""
    key = create_key(stack.database_url, f"wh-{uuid.uuid4().hex[:10]}")
    return httpx.Client(base_url=stack.url, timeout=30,
                        headers={"Authorization": f"Bearer {key}"})


def _sql(stack: RunningStack, statement: Any) -> list[Any]:
    async def run() -> list[Any]:
        engine = make_engine(stack.database_url)
        try:
            async with engine.begin() as conn:
                result = await conn.execute(statement)
                return list(result.all()) if result.returns_rows else []
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _endpoint(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/webhooks", json={"url": HOOK, **body})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def _problem_fields(response: httpx.Response) -> set[str]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return {error["field"] for error in response.json()["errors"]}


def _fresh(delivery: dict[str, Any]) -> bool:
    """Not yet sent, being sent (the dispatcher claimed it), or sent at least once."""
    return delivery["status"] in ("pending", "delivering") or bool(delivery["attempts"])


def _deliveries(client: httpx.Client, path: str) -> list[dict[str, Any]]:
    response = client.get(path, params={"limit": 100})
    assert response.status_code == 200, response.text
    return response.json()["items"]  # type: ignore[no-any-return]


# --- endpoints -------------------------------------------------------------------------------


def test_endpoint_crud_shows_the_secret_once(stack: RunningStack) -> None:
    with _tenant_client(stack) as client:
        created = _endpoint(client, description="builds")
        secret = created["secret"]
        assert secret.startswith("whsec_") and len(secret) > 40
        assert created["events"] == ["*.succeeded", "*.failed", "*.canceled"]
        assert created["enabled"] is True and created["disabled_reason"] is None
        path = created["links"]["self"]
        assert path == f"/v1/webhooks/{created['id']}"

        got = client.get(path)
        assert got.status_code == 200 and "secret" not in got.json()
        listed = client.get("/v1/webhooks")
        assert [item["id"] for item in listed.json()["items"]] == [created["id"]]
        for response in (got, listed):
            assert secret not in response.text

        patched = client.patch(path, json={"events": ["generation.*", "*.failed", "*.failed"],
                                           "description": "renders"})
        assert patched.status_code == 200, patched.text
        assert patched.json()["events"] == ["generation.*", "*.failed"]
        assert patched.json()["description"] == "renders" and patched.json()["url"] == HOOK
        assert secret not in patched.text

        # the URL is checked again when it changes; a null is not "leave it"
        assert _problem_fields(client.patch(path, json={"url": "ftp://127.0.0.1/x"})) == {"url"}
        assert _problem_fields(client.patch(path, json={"url": "http://u:p@127.0.0.1/"})) == {
            "url"}
        assert _problem_fields(client.patch(path, json={"enabled": None})) == {"enabled"}
        moved = client.patch(path, json={"url": "http://127.0.0.1:9/other"})
        assert moved.status_code == 200 and moved.json()["url"] == "http://127.0.0.1:9/other"

        # disabled by the dispatcher (a 410, days of failures), enabled again by the tenant
        _sql(stack, update(WebhookEndpoint).where(WebhookEndpoint.id == created["id"]).values(
            enabled=False, disabled_reason="the receiver answered 410 Gone",
            failing_since=datetime.now(UTC) - timedelta(days=1)))
        disabled = client.get(path).json()
        assert disabled["enabled"] is False and disabled["failing_since"] is not None
        assert disabled["disabled_reason"] == "the receiver answered 410 Gone"
        enabled = client.patch(path, json={"enabled": True}).json()
        assert enabled["enabled"] is True
        assert enabled["disabled_reason"] is None and enabled["failing_since"] is None

        assert client.delete(path).status_code == 204
        gone = client.get(path)
        assert gone.status_code == 404 and gone.json()["code"] == "webhook_not_found"
        assert client.delete(path).status_code == 404


def test_bad_endpoints_are_422_naming_the_field(stack: RunningStack) -> None:
    with _tenant_client(stack) as client:
        for body, field in (
            ({"url": HOOK, "events": ["generation.finished"]}, "events.0"),
            ({"url": HOOK, "events": ["*.*", "painting.succeeded"]}, "events.1"),
            ({"url": HOOK, "events": ["generation"]}, "events.0"),
            ({"url": HOOK, "events": []}, "events"),
            ({"url": "ftp://127.0.0.1/hook"}, "url"),
            ({"url": "not a url"}, "url"),
            ({"url": "http://127.0.0.1/" + "a" * 2048}, "url"),
            ({"url": HOOK, "description": "x\u0000"}, "description"),
            ({"url": HOOK, "secret": "whsec_mine"}, "secret"),
            ({}, "url"),
        ):
            assert field in _problem_fields(client.post("/v1/webhooks", json=body)), body
        assert client.get("/v1/webhooks").json()["items"] == []


def test_endpoints_page_newest_first(stack: RunningStack) -> None:
    with _tenant_client(stack) as client:
        made = [_endpoint(client, description=str(index))["id"] for index in range(5)]
        seen: list[str] = []
        cursor = None
        while True:
            page = client.get("/v1/webhooks", params={"limit": 2, **(
                {"cursor": cursor} if cursor else {})}).json()
            assert len(page["items"]) <= 2
            seen += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == made[::-1]
        bad = client.get("/v1/webhooks", params={"cursor": "nope"})
        assert bad.status_code == 400 and bad.json()["code"] == "invalid_cursor"


def test_rotating_a_secret_keeps_the_old_one_for_the_overlap(stack: RunningStack) -> None:
    with _tenant_client(stack) as client:
        created = _endpoint(client)
        rotated = client.post(f"/v1/webhooks/{created['id']}/rotate-secret")
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()
        assert new["secret"].startswith("whsec_") and new["secret"] != created["secret"]
        expires = datetime.fromisoformat(new["previous_secret_expires_at"])
        # the default overlap is a day
        assert timedelta(hours=23) < expires - datetime.now(UTC) <= timedelta(hours=24)
        stored = _sql(stack, select(WebhookEndpoint.secret, WebhookEndpoint.previous_secret)
                      .where(WebhookEndpoint.id == created["id"]))
        assert tuple(stored[0]) == (new["secret"], created["secret"])
        for response in (client.get(f"/v1/webhooks/{created['id']}"), client.get("/v1/webhooks")):
            assert new["secret"] not in response.text
            assert created["secret"] not in response.text


def test_the_job_secret_is_made_once_and_rotates(stack: RunningStack) -> None:
    with _tenant_client(stack) as client:
        first = client.get("/v1/webhooks/job-secret")
        assert first.status_code == 200, first.text
        secret = first.json()["secret"]
        assert secret.startswith("whsec_") and first.json()["previous_secret_expires_at"] is None
        assert client.get("/v1/webhooks/job-secret").json()["secret"] == secret
        rotated = client.post("/v1/webhooks/job-secret/rotate").json()
        assert rotated["secret"] != secret and rotated["previous_secret_expires_at"]
        assert client.get("/v1/webhooks/job-secret").json()["secret"] == rotated["secret"]
    with _tenant_client(stack) as other:  # every tenant has its own
        made = other.post("/v1/webhooks/job-secret/rotate").json()  # its first: nothing overlaps
        assert made["previous_secret_expires_at"] is None
        assert made["secret"] not in (secret, rotated["secret"])
        assert other.get("/v1/webhooks/job-secret").json()["secret"] == made["secret"]


def test_a_ping_is_a_delivery_that_can_be_sent_again(stack: RunningStack) -> None:
    with _tenant_client(stack) as client:
        endpoint = _endpoint(client)
        pinged = client.post(f"/v1/webhooks/{endpoint['id']}/test")
        assert pinged.status_code == 202, pinged.text
        ping = pinged.json()
        assert ping["event_type"] == "ping" and ping["endpoint_id"] == endpoint["id"]
        assert ping["job_id"] is None and ping["seq"] is None and ping["url"] == HOOK
        assert ping["status"] == "pending"
        assert ping["event_id"].startswith("msg_")
        assert datetime.fromisoformat(ping["next_attempt_at"]) <= datetime.now(UTC)

        again = client.post(f"/v1/webhooks/{endpoint['id']}/deliveries/{ping['id']}/redeliver")
        assert again.status_code == 202, again.text
        assert again.json()["event_id"] == ping["event_id"] and again.json()["id"] != ping["id"]
        second_ping = client.post(f"/v1/webhooks/{endpoint['id']}/test").json()
        assert second_ping["event_id"] != ping["event_id"]

        log = _deliveries(client, f"/v1/webhooks/{endpoint['id']}/deliveries")
        assert [d["id"] for d in log] == [second_ping["id"], again.json()["id"], ping["id"]]
        assert all(_fresh(d) for d in log)
        first = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries", params={"limit": 2})
        assert first.json()["next_cursor"] and len(first.json()["items"]) == 2
        rest = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries",
                          params={"limit": 2, "cursor": first.json()["next_cursor"]}).json()
        assert [d["id"] for d in rest["items"]] == [ping["id"]] and rest["next_cursor"] is None

        missing = client.post(f"/v1/webhooks/{endpoint['id']}/deliveries/nope/redeliver")
        assert missing.status_code == 404 and missing.json()["code"] == "delivery_not_found"


def test_another_tenants_webhooks_and_deliveries_are_404(stack: RunningStack) -> None:
    with _tenant_client(stack) as owner, _tenant_client(stack) as stranger:
        endpoint = _endpoint(owner)
        ping = owner.post(f"/v1/webhooks/{endpoint['id']}/test").json()
        job = owner.post("/v1/generations", json={**SMALL, "webhook": {"url": HOOK}}).json()
        base = f"/v1/webhooks/{endpoint['id']}"
        for method, path, body in (
            ("GET", base, None), ("PATCH", base, {"description": "mine"}), ("DELETE", base, None),
            ("POST", f"{base}/rotate-secret", None), ("POST", f"{base}/test", None),
            ("GET", f"{base}/deliveries", None),
            ("POST", f"{base}/deliveries/{ping['id']}/redeliver", None),
            ("GET", f"/v1/jobs/{job['id']}/deliveries", None),
            ("POST", f"/v1/jobs/{job['id']}/deliveries/{ping['id']}/redeliver", None),
        ):
            response = stranger.request(method, path, json=body)
            assert response.status_code == 404, (method, path, response.text)
        assert stranger.get("/v1/webhooks").json()["items"] == []
        # and nothing was changed by trying
        assert owner.get(base).json()["description"] == ""
        assert len(_deliveries(owner, f"{base}/deliveries")) == 1
        wait_terminal(owner, job["id"])


# --- per-job webhooks ------------------------------------------------------------------------


def _dataset(client: httpx.Client) -> str:
    created = client.post("/v1/datasets", data={"name": f"wh-{uuid.uuid4().hex[:8]}",
                                                "min_side": "64"},
                          files=[("zip", ("d.zip", training_zip(), "application/zip"))])
    assert created.status_code == 201, created.text
    return created.json()["id"]  # type: ignore[no-any-return]


def _job_bodies(client: httpx.Client) -> dict[str, dict[str, Any]]:
    """A small valid body for every job-creating endpoint."""
    dataset_id = _dataset(client)
    ids = catalog(client, f"-wh-{uuid.uuid4().hex[:8]}")
    return {
        "/v1/generations": dict(SMALL),
        "/v1/sweeps": {"base": dict(SMALL), "axes": [{"param": "seed", "values": [1, 2]}]},
        "/v1/taggings": {"dataset_id": dataset_id, "caption": None},
        "/v1/trainings": {
            "name": f"wh-{uuid.uuid4().hex[:8]}", "base_model": "tiny-sd15",
            "dataset_id": dataset_id,
            "data": {"resolution": 64, "batch_size": 1, "min_bucket_reso": 64,
                     "max_bucket_reso": 128, "bucket_reso_steps": 64},
            "optim": {"max_train_steps": 1}},
        "/v1/scenes": {"place": ids["place"], "image": ids["image"], "action": ids["action"],
                       "shot": "medium", "subject": {"gender": "woman"}, "model": "tiny-sd15",
                       "steps": 2, "seed": 1},
    }


def test_every_job_endpoint_takes_a_webhook_and_notifies_its_end(stack: RunningStack) -> None:
    """Each kind is canceled at once (cheap): its end, whatever it is, is a delivery to the
    job's URL, and the webhook is on no spec a worker or a reader sees."""
    with _tenant_client(stack) as client:
        jobs = {}
        for path, body in _job_bodies(client).items():
            response = client.post(path, json={**body, "webhook": {"url": HOOK}})
            assert response.status_code == 202, (path, response.text)
            assert "webhook" not in response.json()["spec"]
            jobs[path] = response.json()["id"]
            client.post(f"/v1/jobs/{jobs[path]}/cancel")
        for path, job_id in jobs.items():
            job = wait_terminal(client, job_id, timeout=180)
            assert "webhook" not in job["spec"], path
            deliveries = _deliveries(client, f"/v1/jobs/{job_id}/deliveries")
            # the default events are the terminal ones: one delivery, of how the job ended
            assert [d["event_type"] for d in deliveries] == [f"job.{job['status']}"], path
            (delivery,) = deliveries
            assert delivery["url"] == HOOK and delivery["endpoint_id"] is None
            assert delivery["event_id"] == f"msg_{job_id}_{delivery['seq']}" and _fresh(delivery)
        stored = _sql(stack, select(Job.webhook).where(Job.id.in_(list(jobs.values()))))
        assert [row.webhook for row in stored] == [
            {"url": HOOK, "events": ["succeeded", "failed", "canceled"]}] * len(jobs)


def test_a_webhook_is_part_of_the_request_an_idempotency_key_names(stack: RunningStack) -> None:
    with _tenant_client(stack) as client:
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        body = {**SMALL, "webhook": {"url": HOOK}}
        first = client.post("/v1/generations", json=body, headers=headers)
        again = client.post("/v1/generations", json=body, headers=headers)
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["Idempotent-Replayed"] == "true"
        other = client.post("/v1/generations", headers=headers,
                            json={**body, "webhook": {"url": "http://127.0.0.1:9/elsewhere"}})
        assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
        without = client.post("/v1/generations", json=SMALL, headers=headers)
        assert without.status_code == 409
        wait_terminal(client, first.json()["id"])


def test_bad_job_webhooks_are_422_at_webhook_fields(stack: RunningStack) -> None:
    with _tenant_client(stack) as client:
        for webhook, field in (
            ({"url": "ftp://127.0.0.1/hook"}, "webhook.url"),
            ({"url": "http://user:secret@127.0.0.1/hook"}, "webhook.url"),
            ({"url": HOOK, "events": ["queued"]}, "webhook.events.0"),
            ({"url": HOOK, "events": []}, "webhook.events"),
            ({"url": HOOK, "secret": "x"}, "webhook.secret"),
            ({"events": ["succeeded"]}, "webhook.url"),
        ):
            response = client.post("/v1/generations", json={**SMALL, "webhook": webhook})
            assert field in _problem_fields(response), webhook
        sweep = client.post("/v1/sweeps", json={
            "base": {**SMALL, "webhook": {"url": HOOK}},
            "axes": [{"param": "seed", "values": [1, 2]}]})
        assert _problem_fields(sweep) == {"base.webhook"}
        assert client.get("/v1/jobs").json()["items"] == []


@pytest.fixture(scope="module")
def strict_stack(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server,
                 model_cache: Path) -> Iterator[RunningStack]:
    """A gateway as production runs it: webhooks may not reach private networks."""
    tmp = tmp_path_factory.mktemp("stack-webhooks-strict")
    running = launch_stack(tmp, database_url=f"sqlite+aiosqlite:///{tmp / 'loomis.db'}",
                           s3=s3_server, model_cache=model_cache, worker=False,
                           extra_env={"LOOMIS_WEBHOOKS__ALLOW_PRIVATE_NETWORKS": "false"})
    yield running
    running.stack.stop()
    running.redis.stop()


def test_private_targets_are_refused_when_private_networks_are_not_allowed(
    strict_stack: RunningStack,
) -> None:
    """The check runs before anything else of a submission: no dataset, place or model is
    looked at, so these bodies need only parse."""
    minimal: dict[str, dict[str, Any]] = {
        "/v1/generations": {"prompt": "a fox"},
        "/v1/sweeps": {"base": {"prompt": "a fox"}, "axes": [{"param": "seed", "values": [1]}]},
        "/v1/taggings": {"dataset_id": "any"},
        "/v1/trainings": {"name": "any", "dataset_id": "any", "optim": {"max_train_steps": 1}},
        "/v1/scenes": {"place": "any", "image": "any", "action": "any", "shot": "medium",
                       "subject": {"gender": "man"}},
    }
    with strict_stack.client() as client:
        for path, body in minimal.items():
            response = client.post(path, json={**body, "webhook": {"url": HOOK}})
            assert _problem_fields(response) == {"webhook.url"}, (path, response.text)
            assert "loopback" in response.json()["errors"][0]["message"]
        for url in ("http://127.0.0.1/hook", "https://127.0.0.1/hook", "http://[::1]/hook",
                    "http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data/",
                    "http://localhost:9/hook"):
            response = client.post("/v1/webhooks", json={"url": url})
            assert _problem_fields(response) == {"url"}, url
        assert client.get("/v1/webhooks").json()["items"] == []
        assert client.get("/v1/jobs").json()["items"] == []


# --- deliveries of job events ----------------------------------------------------------------


def test_a_generation_queues_a_delivery_per_target_and_event(stack: RunningStack) -> None:
    with _tenant_client(stack) as client:
        wanted = _endpoint(client, events=["generation.succeeded", "*.failed"])
        other_kind = _endpoint(client, events=["scene.*", "training.succeeded"])
        disabled = _endpoint(client, events=["*.*"], enabled=False)
        response = client.post("/v1/generations", json={
            **SMALL, "webhook": {"url": HOOK, "events": ["running", "succeeded"]}})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        job = wait_terminal(client, job_id)
        assert job["status"] == "succeeded", job
        manifest = next(a["url"] for a in job["artifacts"] if a["kind"] == "manifest")
        assert "webhook" not in httpx.get(manifest).json()["spec"]

        deliveries = _deliveries(client, f"/v1/jobs/{job_id}/deliveries")
        assert sorted((d["event_type"], d["endpoint_id"] or "") for d in deliveries) == sorted([
            ("job.running", ""), ("job.succeeded", ""), ("job.succeeded", wanted["id"])])
        seqs = {d["event_type"]: d["seq"] for d in deliveries}
        assert 0 < seqs["job.running"] < seqs["job.succeeded"]
        for delivery in deliveries:
            assert delivery["job_id"] == job_id and delivery["url"] == HOOK and _fresh(delivery)
            suffix = f"_{delivery['endpoint_id']}" if delivery["endpoint_id"] else ""
            assert delivery["event_id"] == f"msg_{job_id}_{delivery['seq']}{suffix}"
        # newest first
        assert [d["created_at"] for d in deliveries] == sorted(
            (d["created_at"] for d in deliveries), reverse=True)
        endpoint_log = _deliveries(client, f"/v1/webhooks/{wanted['id']}/deliveries")
        assert [(d["event_type"], d["job_id"]) for d in endpoint_log] == [
            ("job.succeeded", job_id)]
        for quiet in (other_kind, disabled):
            assert _deliveries(client, f"/v1/webhooks/{quiet['id']}/deliveries") == []

        # a redelivery is a new row of the same event: same webhook-id, due now
        own = next(d for d in deliveries
                   if d["event_type"] == "job.succeeded" and d["endpoint_id"] is None)
        again = client.post(f"/v1/jobs/{job_id}/deliveries/{own['id']}/redeliver")
        assert again.status_code == 202, again.text
        assert again.json()["event_id"] == own["event_id"] and again.json()["seq"] == own["seq"]
        assert again.json()["id"] != own["id"] and again.json()["status"] == "pending"
        mine = endpoint_log[0]
        via_endpoint = client.post(
            f"/v1/webhooks/{wanted['id']}/deliveries/{mine['id']}/redeliver").json()
        assert via_endpoint["event_id"] == mine["event_id"]
        log = _deliveries(client, f"/v1/jobs/{job_id}/deliveries")
        assert len(log) == 5 and {log[0]["id"], log[1]["id"]} == {
            again.json()["id"], via_endpoint["id"]}

        # deleting the endpoint keeps its log under the job, and its deliveries can no
        # longer be sent again (there is no secret to sign them with)
        assert client.delete(f"/v1/webhooks/{wanted['id']}").status_code == 204
        log = _deliveries(client, f"/v1/jobs/{job_id}/deliveries")
        assert len(log) == 5
        orphan = next(d for d in log if d["id"] == mine["id"])
        assert orphan["endpoint_id"] is None
        refused = client.post(f"/v1/jobs/{job_id}/deliveries/{orphan['id']}/redeliver")
        assert refused.status_code == 409 and refused.json()["code"] == "webhook_deleted"
        missing = client.get("/v1/jobs/00000000-0000-0000-0000-000000000000/deliveries")
        assert missing.status_code == 404 and missing.json()["code"] == "job_not_found"


def test_progress_deliveries_are_throttled(stack: RunningStack) -> None:
    """At most one progress delivery per target per job in the interval (2 s by default)."""
    with _tenant_client(stack) as client:
        endpoint = _endpoint(client, events=["generation.progress"])
        response = client.post("/v1/generations", json={
            **SMALL, "steps": 12, "webhook": {"url": HOOK, "events": ["progress"]}})
        job_id = response.json()["id"]
        assert wait_terminal(client, job_id)["status"] == "succeeded"
        progress_events = [e for e in events_of(client, job_id) if e["type"] == "progress"]
        assert len(progress_events) >= 12
        deliveries = _deliveries(client, f"/v1/jobs/{job_id}/deliveries")
        for target in (None, endpoint["id"]):
            mine = sorted(datetime.fromisoformat(d["created_at"]) for d in deliveries
                          if d["endpoint_id"] == target)
            assert 1 <= len(mine) < len(progress_events)
            assert all(later - earlier >= timedelta(seconds=1.99)
                       for earlier, later in zip(mine, mine[1:], strict=False))
        assert {d["event_type"] for d in deliveries} == {"job.progress"}


# --- without a stack -------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "kind", "event_type", "matches"), [
    ("generation.succeeded", "generation", "succeeded", True),
    ("generation.succeeded", "generation", "failed", False),
    ("generation.succeeded", "sweep", "succeeded", False),
    ("*.failed", "training", "failed", True),
    ("*.failed", "training", "progress", False),
    ("scene.*", "scene", "sample", True),
    ("scene.*", "tagging", "running", False),
    ("*.*", "tagging", "canceled", True),
])
def test_endpoint_filters(pattern: str, kind: str, event_type: str, matches: bool) -> None:
    assert filter_matches(pattern, kind=kind, event_type=event_type) is matches


def test_the_webhook_never_leaves_the_gateway_in_a_dump_but_is_hashed() -> None:
    bare = GenerationSpec(prompt="a fox")
    hooked = GenerationSpec.model_validate({"prompt": "a fox", "webhook": {"url": HOOK}})
    assert hooked.webhook is not None and hooked.webhook.events == [
        "succeeded", "failed", "canceled"]
    task = GenerationTask(job_id="j", tenant_id="t", spec=hooked)
    assert "webhook" not in task.model_dump(mode="json")["spec"]
    assert hooked.model_dump(mode="json") == bare.model_dump(mode="json")
    assert request_hash(hooked) != request_hash(bare)
    elsewhere = GenerationSpec.model_validate({"prompt": "a fox",
                                               "webhook": {"url": HOOK + "/2"}})
    assert request_hash(elsewhere) != request_hash(hooked)
    sweep = SweepSpec.model_validate({"base": {"prompt": "a fox"},
                                      "axes": [{"param": "seed", "values": [1]}],
                                      "webhook": {"url": HOOK}})
    assert sweep.webhook is not None and "webhook" not in sweep.model_dump()


def test_apply_event_queues_deliveries_and_throttles_progress(tmp_path: Path) -> None:
    """Through ``apply_event`` itself, on SQLite: a progress event within the interval of the
    last progress delivery to the same target is skipped; other events never are."""

    async def run() -> list[tuple[str | None, str, int | None, str]]:
        engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'loomis.db'}")
        await migrate(engine)
        sessionmaker = make_sessionmaker(engine)
        async with sessionmaker() as session:
            tenant = Tenant(id=new_id(), name="throttle")
            session.add(tenant)
            await session.flush()
            job = Job(id=new_id(), tenant_id=tenant.id, kind="generation", status="queued",
                      spec={}, webhook={"url": HOOK, "events": ["running", "progress"]})
            endpoint = WebhookEndpoint(id=new_id(), tenant_id=tenant.id, url=HOOK + "/ep",
                                       events=["generation.progress", "scene.*"],
                                       secret="whsec_test")
            session.add_all([job, endpoint])
            await session.commit()
            job_id = job.id

        async def apply(seq: int, kind: str, interval: float) -> None:
            event = JobEvent(job_id=job_id, seq=seq, type=kind, at=datetime.now(UTC),
                             status=JobStatus.RUNNING)
            async with sessionmaker() as session:
                assert await apply_event(session=session, event=event,
                                         webhook_progress_interval_s=interval)
                await session.commit()

        await apply(1, "running", 60)
        for seq in (2, 3, 4):
            await apply(seq, "progress", 60)
        await apply(5, "progress", 0)  # no interval: every progress event goes
        async with sessionmaker() as session:
            rows = (await session.execute(select(
                WebhookDelivery.endpoint_id, WebhookDelivery.event_type, WebhookDelivery.seq,
                WebhookDelivery.status).order_by(WebhookDelivery.seq,
                                                 WebhookDelivery.endpoint_id))).all()
            count = await session.scalar(text("select count(*) from job_events"))
        assert count == 5
        await engine.dispose()
        return [tuple(row) for row in rows]

    rows = asyncio.run(run())
    endpoint_rows = [row for row in rows if row[0] is not None]
    own_rows = [row for row in rows if row[0] is None]
    assert [(row[1], row[2]) for row in own_rows] == [
        ("job.running", 1), ("job.progress", 2), ("job.progress", 5)]
    assert [(row[1], row[2]) for row in endpoint_rows] == [
        ("job.progress", 2), ("job.progress", 5)]
    assert {row[3] for row in rows} == {"pending"}

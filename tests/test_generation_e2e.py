"""Text-to-image end to end: HTTP gateway -> arq -> generator subprocess -> S3 -> events -> SQL."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import RunningStack, wait_for_event, wait_terminal

SMALL = {"prompt": "a red fox in snow", "model": "tiny-sd15", "steps": 2, "width": 64,
         "height": 64}


def _pixels(url: str) -> tuple[np.ndarray, Image.Image]:
    response = httpx.get(url)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return np.asarray(image), image


def test_generation_succeeds_and_manifest_reproduces_it(stack: RunningStack) -> None:
    with stack.client() as client:
        response = client.post("/v1/generations", json={**SMALL, "width": 96, "seed": 1234})
        assert response.status_code == 202, response.text
        assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
        job = wait_terminal(client, response.json()["id"])
        assert job["status"] == "succeeded", job
        assert job["progress"] == 1.0
        images = [a for a in job["artifacts"] if a["kind"] == "image"]
        manifests = [a for a in job["artifacts"] if a["kind"] == "manifest"]
        assert len(images) == 1 and len(manifests) == 1

        pixels, image = _pixels(images[0]["url"])
        assert image.size == (96, 64)
        assert image.text["parameters"].startswith("a red fox in snow\n")
        assert "Seed: 1234" in image.text["parameters"]
        assert "Size: 96x64" in image.text["parameters"]
        assert json.loads(image.text["loomis"])["job_id"] == job["id"]

        manifest = httpx.get(manifests[0]["url"]).json()
        assert manifest["seeds"] == [1234]
        assert manifest["model"]["name"] == "tiny-sd15"
        assert len(manifest["model"]["sha256"]) == 64
        assert {"torch", "diffusers"} <= set(manifest["versions"])
        assert manifest["timings"]["pipeline_s"] > 0

        again = client.post("/v1/generations", json=manifest["spec"])
        rerun = wait_terminal(client, again.json()["id"])
        rerun_image = next(a for a in rerun["artifacts"] if a["kind"] == "image")
        assert np.array_equal(_pixels(rerun_image["url"])[0], pixels)

        other_seed = client.post("/v1/generations", json={**manifest["spec"], "seed": 1235})
        other = wait_terminal(client, other_seed.json()["id"])
        other_image = next(a for a in other["artifacts"] if a["kind"] == "image")
        assert not np.array_equal(_pixels(other_image["url"])[0], pixels)


def test_batch_records_one_seed_per_image(stack: RunningStack) -> None:
    with stack.client() as client:
        response = client.post("/v1/generations", json={**SMALL, "num_images": 3, "seed": 7})
        job = wait_terminal(client, response.json()["id"])
    images = sorted((a for a in job["artifacts"] if a["kind"] == "image"), key=lambda a: a["index"])
    assert [a["seed"] for a in images] == [7, 8, 9]
    assert stack.s3_keys(f"outputs/{job['spec'] and _tenant(stack, 'alice')}/{job['id']}/") == [
        f"outputs/{_tenant(stack, 'alice')}/{job['id']}/{name}"
        for name in ("0.png", "1.png", "2.png", "manifest.json")
    ]


def _tenant(stack: RunningStack, name: str) -> str:
    import asyncio

    from sqlalchemy import select

    from services.gateway.db.models import Tenant
    from services.gateway.db.session import make_engine, make_sessionmaker

    async def run() -> str:
        engine = make_engine(stack.database_url)
        try:
            async with make_sessionmaker(engine)() as session:
                return str(await session.scalar(select(Tenant.id).where(Tenant.name == name)))
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_server_fills_defaults_and_draws_a_seed(stack: RunningStack) -> None:
    with stack.client() as client:
        job = client.post("/v1/generations", json={"prompt": "defaults"}).json()
    spec = job["spec"]
    assert spec["model"] == "tiny-sd15"
    assert (spec["width"], spec["height"], spec["steps"]) == (64, 64, 4)
    assert isinstance(spec["seed"], int)


def test_idempotency_key(stack: RunningStack) -> None:
    with stack.client() as client:
        first = client.post("/v1/generations", json=SMALL, headers={"Idempotency-Key": "k-1"})
        second = client.post("/v1/generations", json=SMALL, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == second.status_code == 202
        assert first.json()["id"] == second.json()["id"]
        assert second.headers["idempotent-replayed"] == "true"
        changed = client.post("/v1/generations", json={**SMALL, "steps": 3},
                              headers={"Idempotency-Key": "k-1"})
        assert changed.status_code == 409
        assert changed.headers["content-type"] == "application/problem+json"
        assert changed.json()["code"] == "idempotency_key_reused"
    # Keys are per tenant: bob's k-1 is a different job.
    with stack.client("bob") as bob:
        other = bob.post("/v1/generations", json=SMALL, headers={"Idempotency-Key": "k-1"})
        assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


def test_cancel_running_and_queued_jobs(stack: RunningStack) -> None:
    slow = {**SMALL, "width": 256, "height": 256, "steps": 60}
    with stack.client() as client:
        running = client.post("/v1/generations", json=slow).json()
        queued = client.post("/v1/generations", json=slow).json()
        wait_for_event(client, running["id"], "progress")

        # The worker runs one job at a time, so the second is still queued: it ends at once.
        canceled_queued = client.post(f"/v1/jobs/{queued['id']}/cancel")
        assert canceled_queued.status_code == 202
        assert canceled_queued.json()["status"] == "canceled"

        response = client.post(f"/v1/jobs/{running['id']}/cancel")
        assert response.status_code == 202 and response.json()["cancel_requested"] is True
        job = wait_terminal(client, running["id"])
        assert job["status"] == "canceled", job
        assert job["artifacts"] == []
        assert 0 < job["progress"] < 1
        again = client.post(f"/v1/jobs/{running['id']}/cancel")
        assert again.status_code == 409 and again.json()["code"] == "job_finished"
        assert wait_terminal(client, queued["id"])["status"] == "canceled"
    assert stack.s3_keys(f"outputs/{_tenant(stack, 'alice')}/{running['id']}/") == []
    assert stack.s3_keys(f"outputs/{_tenant(stack, 'alice')}/{queued['id']}/") == []


def test_unavailable_weights_fail_cleanly(stack: RunningStack) -> None:
    """A real preset whose weights are not on this machine fails with a code, not a trace."""
    with stack.client() as client:
        response = client.post("/v1/generations", json={"prompt": "x", "model": "sd15",
                                                         "steps": 2})
        assert response.status_code == 202
        job = wait_terminal(client, response.json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "model_unavailable"
    assert "Traceback" not in job["error"]["message"]
    assert job["artifacts"] == []


def test_events_stream_and_resume(stack: RunningStack) -> None:
    from httpx_sse import connect_sse

    with stack.client() as client:
        job = client.post("/v1/generations", json={**SMALL, "steps": 3}).json()
        with connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events") as source:
            events = [(int(s.id), s.event, json.loads(s.data)) for s in source.iter_sse()]
        seqs = [seq for seq, _, _ in events]
        assert seqs == sorted(set(seqs)) and seqs[0] == 1
        types = [kind for _, kind, _ in events]
        assert types[0] == "queued" and types[1] == "running" and types[-1] == "succeeded"
        assert [d["data"]["step"] for _, k, d in events if k == "progress"] == [1, 2, 3]

        # Resuming after the third event replays exactly what came after it.
        with connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events",
                         headers={"Last-Event-ID": str(seqs[2])}) as source:
            resumed = [int(s.id) for s in source.iter_sse()]
        assert resumed == seqs[3:]


def test_list_jobs_pages_and_filters(stack: RunningStack) -> None:
    with stack.client("bob") as client:
        created = [client.post("/v1/generations", json=SMALL).json()["id"] for _ in range(3)]
        for job_id in created:
            wait_terminal(client, job_id)
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/jobs", params=params).json()
            assert len(page["items"]) <= 2
            seen += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert len(seen) == len(set(seen))
        assert set(created) <= set(seen)
        succeeded = client.get("/v1/jobs", params={"status": "succeeded", "limit": 100}).json()
        assert all(item["status"] == "succeeded" for item in succeeded["items"])
        assert client.get("/v1/jobs", params={"status": "bogus"}).status_code == 422
        bad_cursor = client.get("/v1/jobs", params={"cursor": "!!!"})
        assert bad_cursor.status_code == 400 and bad_cursor.json()["code"] == "invalid_cursor"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**SMALL, "width": 13}, "width"),
        ({**SMALL, "steps": 0}, "steps"),
        ({**SMALL, "steps": 10_000}, "steps"),
        ({**SMALL, "model": "no-such-model"}, "model"),
        ({**SMALL, "scheduler": "Warp Drive"}, "scheduler"),
        ({**SMALL, "eta": 0.5}, "eta"),  # the model's own scheduler (Euler) has no eta
        ({**SMALL, "scheduler": "Euler a", "eta": 0.5}, "eta"),
        ({**SMALL, "scheduler": "DDIM", "eta": 1.5}, "eta"),
        ({**SMALL, "prompt": ""}, "prompt"),
        ({**SMALL, "prompt": "   "}, "prompt"),
        ({**SMALL, "prompt": "x" * 2001}, "prompt"),
        ({**SMALL, "num_images": 0}, "num_images"),
        ({**SMALL, "num_images": 9}, "num_images"),
        ({**SMALL, "seed": -1}, "seed"),
        ({**SMALL, "width": 2048}, "width"),
        ({**SMALL, "surprise": True}, "surprise"),
        ({"model": "tiny-sd15"}, "prompt"),
    ],
)
def test_bad_input_is_a_problem_naming_the_field(
    stack: RunningStack, body: dict, field: str  # type: ignore[type-arg]
) -> None:
    with stack.client("bob") as client:
        before = len(client.get("/v1/jobs", params={"limit": 100}).json()["items"])
        response = client.post("/v1/generations", json=body)
        after = len(client.get("/v1/jobs", params={"limit": 100}).json()["items"])
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422 and problem["code"] == "validation_error"
    assert field in [err["field"] for err in problem["errors"]]
    assert field in problem["detail"]
    assert after == before


def test_malformed_json_is_a_400_problem(stack: RunningStack) -> None:
    with stack.client() as client:
        response = client.post("/v1/generations", content=b'{"prompt": "x",',
                               headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "malformed_json"


def test_authentication_and_tenancy(stack: RunningStack) -> None:
    anonymous = httpx.post(f"{stack.url}/v1/generations", json=SMALL)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert anonymous.json()["code"] == "missing_api_key"
    wrong = httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": "Bearer lmk_nope"})
    assert wrong.status_code == 401 and wrong.json()["code"] == "invalid_api_key"

    with stack.client("alice") as alice, stack.client("bob") as bob:
        job = alice.post("/v1/generations", json=SMALL).json()
        for method, path in (("GET", f"/v1/jobs/{job['id']}"),
                             ("GET", f"/v1/jobs/{job['id']}/events"),
                             ("POST", f"/v1/jobs/{job['id']}/cancel")):
            response = bob.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["code"] == "job_not_found"
        assert job["id"] not in [j["id"] for j in bob.get("/v1/jobs?limit=100").json()["items"]]
        wait_terminal(alice, job["id"])


def test_openapi_documents_the_api(stack: RunningStack) -> None:
    schema = httpx.get(f"{stack.url}/openapi.json").json()
    post = schema["paths"]["/v1/generations"]["post"]
    assert "202" in post["responses"] and "422" in post["responses"]
    spec_schema = schema["components"]["schemas"]["GenerationSpec"]
    assert spec_schema["examples"][0]["prompt"]
    assert httpx.get(f"{stack.url}/docs").status_code == 200


def test_the_scheduler_that_ran_is_recorded_in_the_spec(stack: RunningStack) -> None:
    """Left to the model, the scheduler is what the worker used (tiny-sd15's own: Euler), in
    the job's spec, the manifest's and the PNG's, so each of them reproduces the run."""
    with stack.client() as client:
        job = wait_terminal(client, client.post("/v1/generations", json=SMALL).json()["id"])
        assert job["status"] == "succeeded", job
        assert job["spec"]["scheduler"] == job["result"]["scheduler"] == "Euler"
        manifest_url = next(a["url"] for a in job["artifacts"] if a["kind"] == "manifest")
        assert httpx.get(manifest_url).json()["spec"]["scheduler"] == "Euler"
        _, image = _pixels(next(a["url"] for a in job["artifacts"] if a["kind"] == "image"))
        assert json.loads(image.text["loomis"])["spec"]["scheduler"] == "Euler"
        chosen = wait_terminal(client, client.post(
            "/v1/generations", json={**SMALL, "scheduler": "ddim"}).json()["id"])
        assert chosen["spec"]["scheduler"] == "DDIM"


def test_ddim_eta_changes_the_image_and_is_recorded(stack: RunningStack) -> None:
    """eta is DDIM's η: 0 and 1 make different pictures from one seed, and the spec, the PNG's
    parameters (webui's ``Eta DDIM``) and a sweep over it all carry it."""
    ddim = {**SMALL, "scheduler": "DDIM", "steps": 3, "seed": 4}
    with stack.client() as client:
        jobs = [wait_terminal(client, client.post("/v1/generations", json={
            **ddim, "eta": eta}).json()["id"]) for eta in (0.0, 1.0)]
        assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], jobs
        images = [_pixels(next(a["url"] for a in j["artifacts"] if a["kind"] == "image"))
                  for j in jobs]
        assert not np.array_equal(images[0][0], images[1][0])
        assert [j["spec"]["eta"] for j in jobs] == [0.0, 1.0]
        assert "Eta DDIM: 1.0" in images[1][1].text["parameters"]
        assert "Eta DDIM" not in images[0][1].text["parameters"]  # 0 is webui's default
        sweep = wait_terminal(client, client.post("/v1/sweeps", json={
            "base": ddim, "axes": [{"param": "eta", "values": [0, 1]}]}).json()["id"])
        assert sweep["status"] == "succeeded", sweep
        cells = [_pixels(a["url"])[0] for a in sweep["artifacts"] if a["kind"] == "image"]
        assert len(cells) == 2 and np.array_equal(cells[0], images[0][0])
        assert np.array_equal(cells[1], images[1][0])
        refused = client.post("/v1/sweeps", json={
            "base": SMALL, "axes": [{"param": "eta", "values": [0, 1]}]})
        assert refused.status_code == 422 and "eta" in refused.text

"""Subjects end to end on the real stack (tagger, trainer, generator; tiny models): photos in,
a LoRA out, usable in scenes and generations at once, and forgotten completely on DELETE."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from httpx_sse import connect_sse

from tests.conftest import RunningStack, wait_terminal
from tests.subject_support import create, photos, scan, sha, wait_subject
from tests.test_scenes_e2e import base_body, by_kind, catalog, fetch, scene

SQLITE = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def stream(client: httpx.Client, subject_id: str) -> list[dict[str, Any]]:
    with connect_sse(client, "GET", f"/v1/subjects/{subject_id}/events",
                     timeout=httpx.Timeout(30, read=300)) as source:
        return [json.loads(sse.data) for sse in source.iter_sse() if sse.data]


def wait_clean(stack: RunningStack, model_cache: Path, needles: dict[str, str],
               timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    found: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        found = scan(stack, [model_cache], needles)
        if not found:
            return
        time.sleep(0.5)
    raise AssertionError(f"still found after deletion: {found}")


@pytest.mark.parametrize("stack", ["sqlite", "postgres"], indirect=True)
def test_photos_become_a_lora_used_in_a_scene_then_every_trace_is_deleted(
        stack: RunningStack, model_cache: Path) -> None:
    images = photos(5)
    with stack.client() as client:
        ids = catalog(client, "-subject")
        response = create(client, images, caption=True)
        assert response.status_code == 202, response.text
        subject = response.json()
        sid = subject["id"]
        assert subject["status"] in ("preparing", "captioning") and subject["photos"] == 5
        assert subject["token"] and subject["trigger_words"] == [f"{subject['token']} woman"]
        events = stream(client, sid)
        stages = [e["type"] for e in events if e["seq"] is not None]
        assert stages == ["preparing", "captioning", "training", "ready", "photos_deleted"]
        assert any(e["type"] == "progress" for e in events)
        ready = client.get(f"/v1/subjects/{sid}").json()
        assert ready["status"] == "ready" and ready["lora_id"] and ready["purged"]
        lora = client.get(f"/v1/loras/{ready['lora_id']}").json()
        tagging = wait_terminal(client, ready["tagging_job_id"])
        training = wait_terminal(client, ready["training_job_id"])
        assert tagging["status"] == training["status"] == "succeeded"

        # retention: the LoRA is kept, nothing made from the photos is
        keys = stack.s3_keys("")
        assert any(k.startswith("loras/") and ready["lora_id"] in k for k in keys)
        assert not [k for k in keys if ready["dataset_id"] in k or training["id"] in k]
        found = scan(stack, [model_cache], {f"photo {i}": sha(img) for i, img in enumerate(images)})
        assert not found, found
        assert client.get(f"/v1/datasets/{ready['dataset_id']}").status_code == 404

        # a scene with the subject: its face stage runs with the subject's LoRA and trigger
        body = base_body(ids)
        plain = scene(client, body)
        with_subject = scene(client, {**body, "subject": {"id": sid, "details": "a red coat"}})
        face = fetch(by_kind(with_subject, "face_mask")[0]["url"]) > 0
        a = fetch(by_kind(plain, "image")[0]["url"]).astype(int)
        b = fetch(by_kind(with_subject, "image")[0]["url"]).astype(int)
        assert (np.abs(a - b).sum(axis=2)[face] > 0).any()
        assert with_subject["result"]["stages"] == ["body", "face"]
        # a bare id works too, and a generation names the subject the same way
        gen = client.post("/v1/generations", json={"prompt": "a portrait", "model": "tiny-sd15",
                                                   "steps": 2, "seed": 3, "subject": sid})
        assert gen.status_code == 202, gen.text
        gen_job = wait_terminal(client, gen.json()["id"], timeout=120)
        assert gen_job["status"] == "succeeded"
        assert gen_job["spec"]["prompt"].startswith(f"{subject['token']} woman")
        manifest = httpx.get(by_kind(gen_job, "manifest")[0]["url"]).json()
        assert manifest["loras"][0]["subject_id"] == sid
        assert manifest["loras"][0]["sha256"] == lora["sha256"]
        lineage = client.get(f"/v1/subjects/{sid}").json()["lineage"]
        assert {o["job_id"] for o in lineage["outputs"]} == {with_subject["id"], gen_job["id"]}
        assert lineage["loras"][0]["sha256"] == lora["sha256"]

        # forget: everything, the outputs made with it included
        deleted = client.delete(f"/v1/subjects/{sid}", params={"outputs": "true"})
        assert deleted.status_code == 204, deleted.text
        assert client.get(f"/v1/subjects/{sid}").status_code == 404
        assert client.get(f"/v1/jobs/{gen_job['id']}").status_code == 404
        again = client.post("/v1/generations", json={"prompt": "x", "model": "tiny-sd15",
                                                     "loras": [{"id": lora["id"]}]})
        assert again.status_code == 422
        assert again.json()["errors"][0]["field"] == "loras.0.id"
        wait_clean(stack, model_cache, {
            "subject id": sid, "lora id": lora["id"], "lora hash": lora["sha256"],
            **{f"photo {i}": sha(img) for i, img in enumerate(images)}})
        # the scene without the subject is not the subject's: it stays
        assert client.get(f"/v1/jobs/{plain['id']}").status_code == 200


def _problem_field(response: httpx.Response) -> set[str]:
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    return {str(error.get("field")) for error in response.json().get("errors", [])}


@SQLITE
def test_bad_subject_requests_are_problems_naming_the_field_and_store_nothing(
        stack: RunningStack) -> None:
    images = photos(3, seed=5)
    with stack.client() as client:
        before = stack.s3_keys("datasets/")
        count = len(client.get("/v1/subjects").json()["items"])
        not_image = [images[0], images[1], b"this is not an image at all"]
        files = [("photos", (f"{i}.png", img, "image/png")) for i, img in enumerate(images)]
        cases: list[tuple[httpx.Response, str]] = [
            (create(client, []), "photos"),
            (create(client, photos(51, seed=1, side=16)), "photos"),
            (create(client, photos(2)), "photos"),
            (create(client, not_image), "photos[2]"),
            (create(client, [images[0]] * 5), "photos"),
            (client.post("/v1/subjects", data={"name": "x", "class_word": "woman"},
                         files=[("photos", (f"{i}.png", img, "image/png"))
                                for i, img in enumerate(images)]), "consent"),
            (create(client, images, preset="huge"), "preset"),
            (create(client, images, overrides={"optim": {"nonsense": 1}}),
             "overrides.optim.nonsense"),
            (create(client, images, overrides={"optim": {"max_train_steps": 0}}),
             "overrides.optim.max_train_steps"),
            (create(client, images, overrides={"dataset_id": "x"}), "overrides.dataset_id"),
            (create(client, images, overrides={"diffusion": {"cache_latents_to_disk": True}}),
             "overrides.diffusion.cache_latents_to_disk"),
            (create(client, images, token="Bad Token"), "token"),
            (create(client, images, class_word="woman", token="woman"), "token"),
            (create(client, images, webhook={"url": "ftp://x"}), "webhook.url"),
            (create(client, images, webhook={"url": "http://127.0.0.1:9/h", "events": ["bogus"]}),
             "webhook.events.0"),
            (create(client, images, consent="   "), "consent"),
            # found by hostile testing: a 400 blaming the body, a 202 that failed at its
            # training stage, and options sent but never read
            (create(client, images, overrides="{not json"), "overrides"),
            (create(client, images, webhook='{"url": '), "webhook"),
            (create(client, images, overrides={"base_model": "no-such-model"}),
             "overrides.base_model"),
            (create(client, images, overrides={"base_model": "tiny-sdxl"}),
             "overrides.base_model"),
            (client.post("/v1/subjects", data={"name": "x", "class_word": "woman",
                                               "consent": "yes", "preset": "quick"},
                         files=[*files, ("overrides", ("o.json", b'{"optim": {}}',
                                                       "application/json"))]), "overrides"),
            (client.post("/v1/subjects", data={"name": ["x", "y"], "class_word": "woman",
                                               "consent": "yes", "preset": "quick"},
                         files=files), "name"),
            (client.post("/v1/subjects", data={"name": "x", "class_word": "woman",
                                               "consent": "yes", "preset": "quick"},
                         files=[*files, ("selfie", ("s.png", images[0], "image/png"))]),
             "selfie"),
            (client.post("/v1/subjects", json={"name": "x"}), "header.Content-Type"),
            # a 1x1 (or any under 64 px) photo cannot show a face
            (create(client, [images[0], photos(1, seed=9, side=1)[0], images[2]]), "photos[1]"),
        ]
        for response, field in cases:
            assert 400 <= response.status_code < 500, (field, response.text)
            assert field in _problem_field(response), (field, response.text)
        # the detail names the field errors[] names (it said files[2])
        assert "photos[2]" in create(client, not_image).json()["detail"]
        assert stack.s3_keys("datasets/") == before
        assert len(client.get("/v1/subjects").json()["items"]) == count
        # photos under the training resolution are kept and reported, by index
        small = create(client, images, overrides={"data": {"resolution": 128}})
        assert small.status_code == 202, small.text
        assert small.json()["small_photos"] == [
            {"photo": i, "width": 64, "height": 64} for i in range(3)]
        fitting = create(client, photos(3, seed=6))
        assert fitting.json()["small_photos"] == []
        for made in (small, fitting):  # not left training beside the other tests
            assert client.delete(f"/v1/subjects/{made.json()['id']}").status_code == 204


@SQLITE
def test_another_tenant_cannot_see_or_use_a_subject(stack: RunningStack) -> None:
    with stack.client() as client, stack.client("bob") as bob:
        made = create(client, photos(3, seed=21), retain_photos=True)
        assert made.status_code == 202, made.text
        sid = made.json()["id"]
        subject = wait_subject(client, sid, ("ready",))
        assert subject["purged"] is None  # kept: retain_photos
        assert bob.get(f"/v1/subjects/{sid}").status_code == 404
        assert bob.post(f"/v1/subjects/{sid}/cancel").status_code == 404
        assert bob.delete(f"/v1/subjects/{sid}").status_code == 404
        assert sid not in {s["id"] for s in bob.get("/v1/subjects").json()["items"]}
        response = bob.post("/v1/generations", json={"prompt": "x", "model": "tiny-sd15",
                                                     "subject": sid})
        assert response.status_code == 422 and _problem_field(response) == {"subject"}
        response = bob.post("/v1/generations", json={"prompt": "x", "model": "tiny-sd15",
                                                     "loras": [{"id": sid}]})
        assert response.status_code == 422 and _problem_field(response) == {"loras.0.id"}
        scene_body = {"place": "p", "image": "i", "action": "a", "shot": "medium",
                      "subject": sid}
        response = bob.post("/v1/scenes", json=scene_body)
        assert response.status_code == 422
        # kept photos stay until the subject is deleted; then they go too
        dataset = client.get(f"/v1/datasets/{subject['dataset_id']}")
        assert dataset.status_code == 200
        assert client.delete(f"/v1/subjects/{sid}").status_code == 204
        assert client.get(f"/v1/datasets/{subject['dataset_id']}").status_code == 404
        assert not [k for k in stack.s3_keys("") if subject["dataset_id"] in k
                    or subject["lora_id"] in k]


@SQLITE
def test_cancel_during_training_stops_the_chain_and_deletes_the_photos(
        stack: RunningStack) -> None:
    images = photos(3, seed=31)
    with stack.client() as client:
        made = create(client, images, overrides={"optim": {"max_train_steps": 2000}})
        assert made.status_code == 202, made.text
        sid = made.json()["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            subject = client.get(f"/v1/subjects/{sid}").json()
            if subject["status"] == "training" and subject["progress"] > 0:
                break
            time.sleep(0.2)
        assert subject["status"] == "training", subject
        canceled = client.post(f"/v1/subjects/{sid}/cancel")
        assert canceled.status_code == 202, canceled.text
        subject = wait_subject(client, sid, ("canceled",), timeout=120, purged=True)
        assert wait_terminal(client, subject["training_job_id"])["status"] == "canceled"
        assert subject["lora_id"] is None and subject["purged"]["photos"] == 3
        assert client.post(f"/v1/subjects/{sid}/cancel").status_code == 409
        assert not [k for k in stack.s3_keys("") if subject["dataset_id"] in k]


@SQLITE
def test_the_chain_survives_a_gateway_restart_between_captioning_and_training(
        stack: RunningStack) -> None:
    with stack.client() as client:
        made = create(client, photos(3, seed=41), caption=True)
        assert made.status_code == 202, made.text
        sid = made.json()["id"]
        subject = wait_subject(client, sid, ("captioning",), timeout=60)
    gateway = next(c for c in stack.stack.children if c.name == "gateway")
    gateway.popen.kill()  # SIGKILL while the tagger works: its end arrives with no gateway up
    gateway.popen.wait(10)
    stack.stack.children.remove(gateway)
    time.sleep(3)
    stack.stack.start_gateway()
    stack.stack.wait_ready()
    with stack.client() as client:
        subject = wait_subject(client, sid, ("ready", "failed"), timeout=300)
        assert subject["status"] == "ready", subject
        assert subject["tagging_job_id"] and subject["training_job_id"]
        stages = [e["type"] for e in stream(client, sid) if e["seq"] is not None]
        assert stages == ["preparing", "captioning", "training", "ready", "photos_deleted"]
        assert client.delete(f"/v1/subjects/{sid}").status_code == 204


@SQLITE
def test_an_interrupted_deletion_reads_deleting_and_finishes_after_a_restart(
        stack: RunningStack, model_cache: Path) -> None:
    """The state a gateway killed right after a DELETE's first commit leaves (subject
    ``deleting`` with its plan, LoRA row gone, nothing else done yet) is finished by the
    restarted gateway's sweep."""
    import sqlite3

    from services.devstack import stop_child

    images = photos(3, seed=51)
    with stack.client() as client:
        made = create(client, images, retain_photos=True)
        sid = made.json()["id"]
        subject = wait_subject(client, sid, ("ready",))
        lora = client.get(f"/v1/loras/{subject['lora_id']}").json()
    gateway = next(c for c in stack.stack.children if c.name == "gateway")
    stop_child(gateway)
    stack.stack.children.remove(gateway)
    db = sqlite3.connect(stack.database_url.split("///", 1)[1])
    plan = {"loras": [{"id": lora["id"], "sha256": lora["sha256"]}], "outputs": True}
    db.execute("update subjects set status = 'deleting', deletion = ? where id = ?",
               (json.dumps(plan), sid))
    db.execute("delete from loras where id = ?", (lora["id"],))
    db.commit()
    db.close()
    stack.stack.start_gateway()
    stack.stack.wait_ready()
    with stack.client() as client:
        deadline = time.monotonic() + 60
        seen = []
        while time.monotonic() < deadline:
            response = client.get(f"/v1/subjects/{sid}")
            seen.append(response.json().get("status") if response.status_code == 200 else 404)
            if response.status_code == 404:
                break
            time.sleep(0.1)
        assert seen[-1] == 404 and "ready" not in seen, seen
    wait_clean(stack, model_cache, {"subject id": sid, "lora id": lora["id"],
                                    "lora hash": lora["sha256"],
                                    **{f"photo {i}": sha(img) for i, img in enumerate(images)}})


@SQLITE
def test_deleting_an_uploaded_lora_with_outputs_removes_what_it_made(
        stack: RunningStack, model_cache: Path) -> None:
    from tests.lora_files import make_lora

    with stack.client() as client:
        upload = client.post("/v1/loras", data={"base_model": "tiny-sd15", "name": "gone"},
                             files={"file": ("g.safetensors",
                                             make_lora("sd15", cache_dir=model_cache, seed=77),
                                             "application/octet-stream")})
        assert upload.status_code == 201, upload.text
        lora = upload.json()
        made = client.post("/v1/generations", json={"prompt": "a cat", "model": "tiny-sd15",
                                                    "steps": 2, "loras": [{"id": lora["id"]}]})
        job = wait_terminal(client, made.json()["id"], timeout=120)
        assert job["status"] == "succeeded"
        kept = client.post("/v1/generations", json={"prompt": "a cat", "model": "tiny-sd15",
                                                    "steps": 2})
        kept_job = wait_terminal(client, kept.json()["id"], timeout=120)
        assert client.delete(f"/v1/loras/{lora['id']}", params={"outputs": "true"}).status_code == 204
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert not stack.s3_keys(f"outputs/{job['id']}") and not [
            k for k in stack.s3_keys("outputs/") if job["id"] in k]
        assert client.get(f"/v1/jobs/{kept_job['id']}").status_code == 200
        assert client.delete(f"/v1/loras/{lora['id']}").status_code == 404
    wait_clean(stack, model_cache, {"lora id": lora["id"], "lora hash": lora["sha256"]})


@SQLITE
def test_a_subject_webhook_hears_every_stage_signed(stack: RunningStack) -> None:
    from standardwebhooks import Webhook

    from tests.test_webhooks_e2e import Receiver

    own, endpoint = Receiver().start(), Receiver().start()
    try:
        with stack.client() as client:
            hook = client.post("/v1/webhooks", json={"url": endpoint.url,
                                                     "events": ["subject.ready"]})
            assert hook.status_code == 201, hook.text
            bad = client.post("/v1/webhooks", json={"url": endpoint.url,
                                                    "events": ["subject.succeeded"]})
            assert bad.status_code == 422
            made = create(client, photos(3, seed=61), webhook=own.url)  # a bare URL will do
            assert made.status_code == 202, made.text
            sid = made.json()["id"]
            wait_subject(client, sid, ("ready",), purged=True)
            secret = client.get("/v1/webhooks/job-secret").json()["secret"]
            received = own.wait(4)
            # sent at once, so they may arrive in any order: `seq` orders them
            payloads = sorted((Webhook(secret).verify(r.body, r.headers) for r in received),
                              key=lambda p: p["seq"])
            assert [p["type"] for p in payloads] == [
                "subject.preparing", "subject.training", "subject.ready",
                "subject.photos_deleted"]
            assert all(p["data"]["id"] == sid for p in payloads)
            assert payloads[2]["data"]["lora_id"]
            (only,) = endpoint.wait(1)
            assert Webhook(hook.json()["secret"]).verify(only.body, only.headers)["type"] == (
                "subject.ready")
            assert client.delete(f"/v1/subjects/{sid}").status_code == 204
            client.delete(f"/v1/webhooks/{hook.json()['id']}")
            # its own webhook's `events` choose the stages: only the end here
            picky = Receiver().start()
            try:
                made = create(client, photos(3, seed=62),
                              webhook={"url": picky.url, "events": ["succeeded", "failed"]})
                sid = made.json()["id"]
                wait_subject(client, sid, ("ready",), purged=True)
                (end,) = picky.wait(1)
                time.sleep(1.0)
                assert len(picky.received) == 1
                assert Webhook(secret).verify(end.body, end.headers)["type"] == "subject.ready"
                assert client.delete(f"/v1/subjects/{sid}").status_code == 204
            finally:
                picky.stop()
    finally:
        own.stop()
        endpoint.stop()


@SQLITE
def test_deleting_a_subject_mid_training_cancels_it_first_and_leaves_nothing(
        stack: RunningStack, model_cache: Path) -> None:
    images = photos(3, seed=71)
    with stack.client() as client:
        made = create(client, images, retain_photos=True,
                      overrides={"optim": {"max_train_steps": 2000}})
        sid = made.json()["id"]
        deadline = time.monotonic() + 120
        subject = made.json()
        while time.monotonic() < deadline and not (
                subject["status"] == "training" and subject["progress"] > 0):
            time.sleep(0.2)
            subject = client.get(f"/v1/subjects/{sid}").json()
        assert subject["status"] == "training", subject
        job_id = subject["training_job_id"]
        response = client.delete(f"/v1/subjects/{sid}", params={"outputs": "true"})
        assert response.status_code in (202, 204), response.text
        if response.status_code == 202:
            assert response.json()["status"] == "deleting"
        deadline = time.monotonic() + 60
        while client.get(f"/v1/subjects/{sid}").status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
        assert client.delete(f"/v1/subjects/{sid}").status_code == 404
    wait_clean(stack, model_cache, {"subject id": sid, "training job": job_id,
                                    **{f"photo {i}": sha(img) for i, img in enumerate(images)}})


def _at_once(calls: list[Any]) -> list[httpx.Response]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


@pytest.mark.parametrize("stack", ["sqlite", "postgres"], indirect=True)
def test_racing_requests_never_500_nor_leave_anything(stack: RunningStack,
                                                      model_cache: Path) -> None:
    """Found by hostile testing: concurrent DELETEs overwrote each other's plan (the LoRA file
    stayed), a DELETE right after the POST left the stage's job behind, concurrent cancels
    were 500s (a duplicate event seq)."""
    import redis as redis_client

    from shared.evictions import LORA_EVICTIONS_STREAM, eviction_digest

    r = redis_client.Redis.from_url(stack.redis.url)
    with stack.client() as client:
        made = create(client, photos(3, seed=81), retain_photos=True)
        sid = made.json()["id"]
        subject = wait_subject(client, sid, ("ready",))
        lora = client.get(f"/v1/loras/{subject['lora_id']}").json()
        clients = [stack.client() for _ in range(4)]
        answers = _at_once([lambda c=c: c.delete(f"/v1/subjects/{sid}") for c in clients])
        assert all(a.status_code in (204, 404) for a in answers), [a.text for a in answers]
        assert not [k for k in stack.s3_keys("loras/") if lora["id"] in k]
        digests = [fields[b"digest"].decode() for _, fields in r.xrange(LORA_EVICTIONS_STREAM)]
        assert eviction_digest(lora["sha256"]) in digests

        # a DELETE at once after the POST: the stage job it started goes too
        made = create(client, photos(3, seed=82), caption=True)
        sid = made.json()["id"]
        assert client.delete(f"/v1/subjects/{sid}").status_code in (202, 204)
        deadline = time.monotonic() + 60
        while client.get(f"/v1/subjects/{sid}").status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # a stage job made as the DELETE ran is dropped once it has stopped
        wait_clean(stack, model_cache, {"subject id": sid})

        # three cancels at once: one 202, the others 202 or 409, never a 500
        made = create(client, photos(3, seed=83))
        sid = made.json()["id"]
        answers = _at_once([lambda c=c: c.post(f"/v1/subjects/{sid}/cancel") for c in clients])
        assert {a.status_code for a in answers} <= {202, 409}, [a.text for a in answers]
        assert wait_subject(client, sid, ("canceled",), purged=True)["status"] == "canceled"
        odd = client.get(f"/v1/subjects/{sid}/events", headers={"Last-Event-ID": "²".encode("latin-1")})
        assert odd.status_code == 200
        for c in clients:
            c.close()
        assert client.delete(f"/v1/subjects/{sid}").status_code == 204

        # a token names one subject, whatever its case
        first = create(client, photos(3, seed=84), token="Zeta")
        assert first.status_code == 202 and first.json()["token"] == "zeta"
        second = create(client, photos(3, seed=85), token="ZETA")
        assert second.status_code == 422 and _problem_field(second) == {"token"}
        wait_subject(client, first.json()["id"], ("ready",))
        both = client.post("/v1/generations", json={
            "prompt": "x", "model": "tiny-sd15", "loras": [
                {"id": first.json()["id"]}, {"id": client.get(
                    f"/v1/subjects/{first.json()['id']}").json()["lora_id"]}]})
        assert both.status_code == 422 and _problem_field(both) == {"loras.1.id"}
        assert client.delete(f"/v1/subjects/{first.json()['id']}").status_code == 204

"""Subjects end to end on the real stack (tagger, trainer, generator; tiny models): photos in,
a LoRA out, usable in scenes and generations at once, and forgotten completely on DELETE."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from httpx_sse import connect_sse
from PIL import Image

from tests.conftest import RunningStack, wait_terminal
from tests.subject_support import create, photos, scan, sha, wait_subject
from tests.test_scenes_e2e import base_body, by_kind, catalog, fetch, scene

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


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
        assert any(k.startswith(f"loras/") and ready["lora_id"] in k for k in keys)
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

"""LoRA training end to end: dataset -> training job -> registered LoRA -> generation."""

from __future__ import annotations

import io
import zipfile

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import RunningStack, wait_terminal
from tests.test_modes_e2e import images_of, run

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def training_zip() -> bytes:
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(4):
            pixels = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="PNG")
            archive.writestr(f"img/2_sks dog/{index}.png", out.getvalue())
    return buffer.getvalue()


def events_of(client: httpx.Client, job_id: str) -> list[dict]:  # type: ignore[type-arg]
    import json

    from httpx_sse import connect_sse

    out = []
    with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as source:
        for sse in source.iter_sse():
            if sse.data:
                out.append(json.loads(sse.data))
    return out


def test_training_registers_a_lora_that_changes_generation(stack: RunningStack) -> None:
    with stack.client() as client:
        dataset_id = client.post("/v1/datasets", data={"name": "dog", "min_side": "64"}, files=[
            ("zip", ("d.zip", training_zip(), "application/zip"))]).json()["id"]
        response = client.post("/v1/trainings", json={
            "name": "sks-dog", "base_model": "tiny-sd15", "dataset_id": dataset_id,
            "data": {"resolution": 64, "batch_size": 2, "min_bucket_reso": 64,
                     "max_bucket_reso": 128, "bucket_reso_steps": 64},
            "network": {"rank": 4, "alpha": 4},
            "optim": {"learning_rate": 0.005, "max_train_steps": 4, "seed": 1},
            "samples": {"prompts": "# one sample\na photo of sks dog --w 64 --h 64 --s 2 --d 5",
                        "every_n_steps": 2},
            "save": {"every_n_steps": 2},
        })
        assert response.status_code == 202, response.text
        job = wait_terminal(client, response.json()["id"], timeout=180)
        assert job["status"] == "succeeded", job
        assert job["kind"] == "training" and job["result"]["steps"] == 4
        assert np.isfinite(job["result"]["final_loss"])
        lora_id = job["result"]["lora"]["id"]
        assert job["result"]["lora"]["trigger_words"] == ["sks dog"]
        kinds = [event["type"] for event in events_of(client, job["id"])]
        assert kinds.count("sample") >= 2 and "progress" in kinds
        progress = [e for e in events_of(client, job["id"]) if e["type"] == "progress"
                    and "loss" in e["data"]]
        assert {"step", "epoch", "loss", "lr", "it_per_s", "eta_s"} <= set(progress[-1]["data"])
        assert any("/checkpoints/step-" in k for k in stack.s3_keys("training/"))

        lora = client.get(f"/v1/loras/{lora_id}").json()
        assert lora["source"] == "training" and lora["format"] == "kohya"
        spec = {"prompt": "a photo of sks dog", "model": "tiny-sd15", "steps": 3, "seed": 9}
        base = images_of(run(client, spec))[0]
        tuned = images_of(run(client, {**spec, "loras": [{"id": lora_id, "weight": 1.0}]}))[0]
        assert not np.array_equal(base, tuned)


def test_bad_training_requests_are_problems(stack: RunningStack) -> None:
    with stack.client() as client:
        dataset_id = client.post("/v1/datasets", data={"name": "d2", "min_side": "64"}, files=[
            ("zip", ("d.zip", training_zip(), "application/zip"))]).json()["id"]
        base = {"name": "x", "dataset_id": dataset_id, "optim": {"max_train_steps": 2}}
        cases = [
            ({**base, "dataset_config": "[general]\nshuffle_captions = true\n"},
             "dataset_config.general.shuffle_captions"),
            ({**base, "diffusion": {"cache_latents": True}, "data": {"flip_aug": True}}, "body"),
            ({**base, "network": {"rank": 0}}, "network.rank"),
            ({**base, "dataset_id": "missing"}, "dataset_id"),
            ({**base, "optim": {"max_train_steps": 2, "optimizer": "AdamW8bit"}},
             "optim.optimizer"),
            ({**base, "base_model": "tiny-sdxl"}, "base_model"),
        ]
        before = len(client.get("/v1/jobs", params={"kind": "training"}).json()["items"])
        for body, field in cases:
            response = client.post("/v1/trainings", json=body)
            assert 400 <= response.status_code < 500, (field, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            assert any(e["field"].startswith(field) for e in response.json()["errors"]), \
                (field, response.json())
        assert len(client.get("/v1/jobs", params={"kind": "training"}).json()["items"]) == before

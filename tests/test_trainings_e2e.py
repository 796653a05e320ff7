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
            ({**base, "diffusion": {"cache_latents": True}, "data": {"flip_aug": True}},
             "diffusion.cache_latents"),
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


def _fields(response: httpx.Response) -> set[str]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return {error["field"] for error in response.json()["errors"]}


def test_resolutions_and_buckets_out_of_bounds_are_422_at_their_field(
        stack: RunningStack) -> None:
    """Each of these was a 500 (a zero-size bucket), a job that failed in the worker, or one
    that trained at another size than it reported."""
    with stack.client() as client:
        dataset_id = client.post("/v1/datasets", data={"name": "reso", "min_side": "64"}, files=[
            ("zip", ("d.zip", training_zip(), "application/zip"))]).json()["id"]
        base = {"name": "x", "dataset_id": dataset_id, "optim": {"max_train_steps": 1}}
        subset = '[[datasets.subsets]]\nimage_dir = "2_sks dog"\n'
        cases: list[tuple[dict, str]] = [  # type: ignore[type-arg]
            *(({**base, "data": {"resolution": bad}}, "data.resolution")
              for bad in (8, 0, 32, 63, -64, 100000)),
            ({**base, "data": {"resolution": [64, 0]}}, "data.resolution.1"),
            ({**base, "data": {"bucket_reso_steps": 100000}}, "data.bucket_reso_steps"),
            ({**base, "data": {"resolution": 8, "enable_bucket": False}}, "data.resolution"),
            ({**base, "data": {"resolution": 64}}, "data.resolution"),  # min_bucket_reso 256
            ({**base, "data": {"resolution": 512, "bucket_reso_steps": 512}},
             "data.min_bucket_reso"),
            ({**base, "dataset_config": "[[datasets]]\nresolution = 8\n" + subset},
             "dataset_config.datasets.0.resolution"),
            ({**base, "dataset_config": "[general]\nbucket_reso_steps = 100000\n[[datasets]]\n"
              + subset}, "dataset_config.general.bucket_reso_steps"),
            ({**base, "dataset_config": "[[datasets]\n"}, "dataset_config"),
        ]
        before = len(client.get("/v1/jobs", params={"kind": "training"}).json()["items"])
        for body, field in cases:
            assert field in _fields(client.post("/v1/trainings", json=body)), (body, field)
        assert len(client.get("/v1/jobs", params={"kind": "training"}).json()["items"]) == before


def test_training_errors_name_every_field_at_its_path(stack: RunningStack) -> None:
    with stack.client() as client:
        no_length = _fields(client.post("/v1/trainings", json={
            "name": "x", "dataset_id": "d", "network": {"rank": 0}}))
        assert {"optim.max_train_steps", "network.rank"} <= no_length
        assert "body" not in no_length
        assert _fields(client.post("/v1/trainings", json={
            "name": "x", "dataset_id": "d", "optim": {"max_train_steps": 1},
            "data": {"random_crop": True}, "diffusion": {"cache_latents": True}})) == {
                "diffusion.cache_latents"}
        assert _fields(client.post("/v1/trainings", json={
            "name": "x", "dataset_id": "d", "optim": {"max_train_steps": 1},
            "samples": {"prompts": "a photo --ss eulr"}})) == {"samples.prompts"}


def test_what_only_the_trainer_can_refuse_fails_with_a_code(stack: RunningStack) -> None:
    """A spec the worker refuses (here target modules the model does not have) ends as a
    coded failure that says it was the training, not an internal error about generation."""
    with stack.client() as client:
        dataset_id = client.post("/v1/datasets", data={"name": "refused", "min_side": "64"},
                                 files=[("zip", ("d.zip", training_zip(),
                                                 "application/zip"))]).json()["id"]
        response = client.post("/v1/trainings", json={
            "name": "x", "dataset_id": dataset_id, "network": {"target_modules": ["nowhere"]},
            "data": {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128},
            "optim": {"max_train_steps": 1}})
        assert response.status_code == 202, response.text
        job = wait_terminal(client, response.json()["id"], timeout=120)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "invalid_spec", job["error"]
    assert job["error"]["message"].startswith("training refused: ")
    assert "nowhere" in job["error"]["message"]

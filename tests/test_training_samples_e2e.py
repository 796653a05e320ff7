"""Sample images during training use kohya's sampler: `samples.sampler` and a line's `--ss`."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import RunningStack, wait_terminal
from tests.test_trainings_e2e import events_of, training_zip

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def _fields(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return {error["field"]: error["message"] for error in response.json()["errors"]}


def test_each_sample_is_drawn_with_the_sampler_it_asks_for(stack: RunningStack) -> None:
    line = "a photo of sks dog --w 64 --h 64 --s 3 --d 5"
    with stack.client() as client:
        dataset_id = client.post("/v1/datasets", data={"name": "samplers", "min_side": "64"},
                                 files=[("zip", ("d.zip", training_zip(),
                                                 "application/zip"))]).json()["id"]
        response = client.post("/v1/trainings", json={
            "name": "samplers", "dataset_id": dataset_id,
            "data": {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128},
            "optim": {"max_train_steps": 1, "seed": 1},
            # the same prompt and seed three times: only the sampler differs
            "samples": {"prompts": f"{line}\n{line} --ss K_EULER_A\n{line} --ss dpm_2",
                        "sampler": "Euler", "every_n_steps": 1},
        })
        assert response.status_code == 202, response.text
        job = wait_terminal(client, response.json()["id"], timeout=180)
        assert job["status"] == "succeeded", job
        samples = sorted((e["data"] for e in events_of(client, job["id"]) if e["type"] == "sample"),
                         key=lambda d: d["index"])
    assert [(s["sampler"], s["scheduler"]) for s in samples] == [
        ("euler", "Euler"), ("k_euler_a", "Euler a"), ("dpm_2", "DPM2")]
    s3 = stack.s3.client()
    pixels = [np.asarray(Image.open(io.BytesIO(
        s3.get_object(Bucket=stack.bucket, Key=s["key"])["Body"].read())).convert("RGB"))
        for s in samples]
    assert not np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])


def test_unknown_samplers_and_bad_lines_are_422_before_a_job_exists(stack: RunningStack) -> None:
    with stack.client() as client:
        before = len(client.get("/v1/jobs", params={"kind": "training"}).json()["items"])
        base = {"name": "x", "dataset_id": "d", "optim": {"max_train_steps": 1}}
        errors = _fields(client.post("/v1/trainings", json={
            **base, "samples": {"sampler": "eulr_a"}}))
        assert set(errors) == {"samples.sampler"} and "euler_a" in errors["samples.sampler"]
        errors = _fields(client.post("/v1/trainings", json={
            **base, "samples": {"prompts": "# c\na dog\n\na cat --ss dpm++"}}))
        assert set(errors) == {"samples.prompts"}
        assert "line 4: unknown sampler 'dpm++'" in errors["samples.prompts"]
        errors = _fields(client.post("/v1/trainings", json={
            **base, "samples": {"prompts": "a dog --s many"}}))
        assert "line 1: --s expects a whole number" in errors["samples.prompts"]
        assert len(client.get("/v1/jobs", params={"kind": "training"}).json()["items"]) == before

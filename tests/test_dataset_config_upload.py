"""A kohya user's zip brings its own ``dataset_config.toml`` and ``metadata.json``: the TOML is
kept with the dataset, shown in its report and trained with; fine-tuning subsets train on
``caption, tags`` as kohya's do."""

from __future__ import annotations

import io
import json
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.conftest import RunningStack, wait_terminal

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

# Differs from what the folder name (2 repeats) and the request defaults (512 px, batch 1) say.
TOML = """\
[general]
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
bucket_reso_steps = 64

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = 'C:\\train\\img\\2_sks dog'
  num_repeats = 3
"""

FINE_TUNING_TOML = """\
[[datasets]]
resolution = 64
batch_size = 2
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128

  [[datasets.subsets]]
  image_dir = "img/2_sks dog"
  metadata_file = "metadata.json"
"""


def _zip(extra: dict[str, bytes]) -> bytes:
    rng = np.random.default_rng(5)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(4):
            pixels = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="PNG")
            archive.writestr(f"img/2_sks dog/{index}.png", out.getvalue())
        for name, data in extra.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _upload(client: object, extra: dict[str, bytes]):  # type: ignore[no-untyped-def]
    return client.post("/v1/datasets", data={"name": "dog", "min_side": "64"},  # type: ignore[attr-defined]
                       files=[("zip", ("d.zip", _zip(extra), "application/zip"))])


def _lora_metadata(stack: RunningStack, lora_id: str) -> dict[str, str]:
    (key,) = [k for k in stack.s3_keys("loras/") if f"/{lora_id}/" in k]
    data = stack.s3.client().get_object(Bucket=stack.bucket, Key=key)["Body"].read()
    (length,) = struct.unpack("<Q", data[:8])
    metadata: dict[str, str] = json.loads(data[8:8 + length])["__metadata__"]
    return metadata


def _body(dataset_id: str) -> dict[str, object]:
    return {"name": "sks-dog", "base_model": "tiny-sd15", "dataset_id": dataset_id,
            "network": {"rank": 4, "alpha": 4},
            "optim": {"learning_rate": 0.001, "max_train_steps": 2, "seed": 1}}


def _train(client: object, dataset_id: str) -> dict:  # type: ignore[type-arg]
    response = client.post("/v1/trainings", json=_body(dataset_id))  # type: ignore[attr-defined]
    assert response.status_code == 202, response.text
    job: dict = wait_terminal(client, response.json()["id"], timeout=180)  # type: ignore[type-arg]
    assert job["status"] == "succeeded", job
    return job


def test_a_zips_dataset_config_is_kept_shown_and_trained_with(stack: RunningStack) -> None:
    with stack.client() as client:
        response = _upload(client, {"dataset_config.toml": TOML.encode()})
        assert response.status_code == 201, response.text
        dataset = response.json()
        assert dataset["dataset_config"] == TOML
        (shown,) = dataset["report"]["dataset_config"]
        assert (shown["resolution"], shown["batch_size"]) == ([64, 64], 2)
        assert [(s["num_repeats"], s["image_dir"]) for s in shown["subsets"]] == [
            (3, "C:\\train\\img\\2_sks dog")]
        again = client.get(f"/v1/datasets/{dataset['id']}").json()
        assert again["dataset_config"] == TOML and again["report"]["dataset_config"] == [shown]

        plan = client.post("/v1/trainings/plan", json=_body(dataset["id"]))
        assert plan.status_code == 200, plan.text
        assert [(s["folder"], s["num_repeats"]) for s in plan.json()["subsets"]] == [("2_sks dog", 3)]
        job = _train(client, dataset["id"])
        assert job["spec"]["dataset_config"] == TOML  # the resolved spec names what trained
        meta = _lora_metadata(stack, job["result"]["lora"]["id"])
        assert json.loads(meta["ss_dataset_dirs"]) == {"2_sks dog": {"n_repeats": 3, "img_count": 4}}
        assert meta["ss_num_train_images"] == "12"  # 4 images x the TOML's 3 repeats


def test_fine_tuning_trains_on_caption_then_tags(stack: RunningStack) -> None:
    metadata = {f"2_sks dog/{i}": {"caption": "a photo of sks dog", "tags": "red collar, grass"}
                for i in range(4)}
    with stack.client() as client:
        response = _upload(client, {"dataset_config.toml": FINE_TUNING_TOML.encode(),
                                    "metadata.json": json.dumps(metadata).encode()})
        assert response.status_code == 201, response.text
        job = _train(client, response.json()["id"])
        meta = _lora_metadata(stack, job["result"]["lora"]["id"])
        # kohya's ss_tag_frequency counts the comma-separated parts of the text trained on
        assert json.loads(meta["ss_tag_frequency"]) == {
            "2_sks dog": {"a photo of sks dog": 4, "red collar": 4, "grass": 4}}


@pytest.mark.parametrize(("toml", "message"), [
    (b"[[datasets]\n", "not valid TOML"),
    (b"[general]\nshuffle_captions = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n",
     "shuffle_captions"),
    (b"[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'img/5_cat'\n", "names no folder"),
])
def test_a_bad_dataset_config_in_a_zip_is_a_422_naming_the_file(
        stack: RunningStack, toml: bytes, message: str) -> None:
    with stack.client() as client:
        before = stack.s3_keys("datasets/")
        response = _upload(client, {"conf/dataset_config.toml": toml})
        assert response.status_code == 422, response.text
        (error,) = response.json()["errors"]
        assert error["field"] == "zip:conf/dataset_config.toml"
        assert message in error["message"]
        assert stack.s3_keys("datasets/") == before  # nothing stored


def test_a_stored_config_that_does_not_fit_the_request_is_a_422_on_dataset_id(
        stack: RunningStack) -> None:
    toml = TOML.replace("resolution = 64\n", "")  # inherits the request's resolution
    with stack.client() as client:
        dataset = _upload(client, {"dataset_config.toml": toml.encode()}).json()
        # Ids only: artifact URLs are presigned afresh on every GET.
        jobs_before = [job["id"] for job in client.get("/v1/jobs").json()["items"]]
        response = client.post("/v1/trainings", json=_body(dataset["id"]))  # 512 px by default
        assert response.status_code == 422, response.text
        (error,) = response.json()["errors"]
        assert error["field"] == "dataset_id"
        assert "dataset_config.toml" in error["message"]
        assert "data.resolution" in error["message"] and "max_bucket_reso 128" in error["message"]
        assert [job["id"] for job in client.get("/v1/jobs").json()["items"]] == jobs_before
        fits = client.post("/v1/trainings/plan", json={**_body(dataset["id"]),
                                                       "data": {"resolution": 64, "min_bucket_reso": 64}})
        assert fits.status_code == 200, fits.text

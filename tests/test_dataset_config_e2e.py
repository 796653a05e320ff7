"""A kohya dataset config TOML through POST /v1/trainings: its per-dataset resolution, buckets
and batch size and its per-subset options reach training, or are a 422 naming the TOML key."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.conftest import RunningStack, wait_terminal

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

# kohya's class+identifier example from its documentation, keys as it spells them; the folders
# are the dataset's subsets, and a second [[datasets]] at another resolution and batch size.
DOC_TOML = r"""
[general]
enable_bucket = true                        # Whether to use Aspect Ratio Bucketing
min_bucket_reso = 64
max_bucket_reso = 256
bucket_reso_steps = 64

[[datasets]]
resolution = 64                             # Training resolution
batch_size = 4                              # Batch size

  [[datasets.subsets]]
  image_dir = '2_sks dog'                   # Training images
  class_tokens = 'sks dog'                  # identifier class
  num_repeats = 2                           # Repeats of the training images
  shuffle_caption = true
  keep_tokens = 1

[[datasets]]
resolution = [128, 64]
batch_size = 1

  [[datasets.subsets]]
  image_dir = '1_wide'
  class_tokens = 'wide view'
  num_repeats = 1
  flip_aug = true
  random_crop = true
"""


def _zip() -> bytes:
    rng = np.random.default_rng(5)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for folder, count, size in (("2_sks dog", 4, (64, 64)), ("1_wide", 2, (128, 64))):
            for index in range(count):
                pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
                out = io.BytesIO()
                Image.fromarray(pixels).save(out, format="PNG")
                archive.writestr(f"img/{folder}/{index}.png", out.getvalue())
    return buffer.getvalue()


def _metadata(lora: bytes) -> dict[str, str]:
    size = int.from_bytes(lora[:8], "little")
    header: dict[str, str] = json.loads(lora[8:8 + size])["__metadata__"]
    return header


def test_each_dataset_trains_at_its_own_resolution_buckets_and_batch_size(stack: RunningStack) -> None:
    with stack.client() as client:
        dataset_id = client.post("/v1/datasets", data={"name": "toml", "min_side": "64"}, files=[
            ("zip", ("d.zip", _zip(), "application/zip"))]).json()["id"]
        response = client.post("/v1/trainings", json={
            "name": "toml-lora", "dataset_id": dataset_id, "dataset_config": DOC_TOML,
            "network": {"rank": 4}, "optim": {"max_train_epochs": 1, "seed": 1},
            "diffusion": {"max_token_length": 150}})
        assert response.status_code == 202, response.text
        job = wait_terminal(client, response.json()["id"], timeout=240)
        assert job["status"] == "succeeded", job
        # kohya: dataset 0 has 4 images x 2 repeats in bucket 64x64, batches of 4 -> 2 steps;
        # dataset 1 has 2 images in bucket 128x64, batches of 1 -> 2 steps. (The request's
        # own batch_size 1 and 512 px would have given 10 steps at 256x256 buckets.)
        assert job["result"]["steps"] == 4
        lora_id = job["result"]["lora"]["id"]
    key = next(k for k in stack.s3_keys("") if lora_id in k and k.endswith(".safetensors"))
    body = stack.s3.client().get_object(Bucket=stack.bucket, Key=key)["Body"].read()
    metadata = _metadata(body)
    first, second = json.loads(metadata["ss_datasets"])
    assert (first["batch_size_per_device"], first["resolution"]) == (4, [64, 64])
    assert (second["batch_size_per_device"], second["resolution"]) == (1, [128, 64])
    assert first["bucket_info"]["buckets"]["0"] == {"resolution": [64, 64], "count": 8}
    assert second["bucket_info"]["buckets"]["0"] == {"resolution": [128, 64], "count": 2}
    assert first["subsets"][0]["shuffle_caption"] is True and first["subsets"][0]["keep_tokens"] == 1
    assert second["subsets"][0]["flip_aug"] is True and first["subsets"][0]["flip_aug"] is False
    assert second["subsets"][0]["random_crop"] is True and first["subsets"][0]["random_crop"] is False
    assert metadata["ss_max_token_length"] == "150"
    assert metadata["ss_num_batches_per_epoch"] == "4"


def test_toml_values_meet_the_same_rules_as_the_requests(stack: RunningStack) -> None:
    subset = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "2_sks dog"\n'
    cases = [
        ({"diffusion": {"cache_latents": True},
          "dataset_config": "[general]\nflip_aug = true\n" + subset}, "dataset_config.general.flip_aug"),
        ({"diffusion": {"cache_latents": True},
          "dataset_config": subset + "color_aug = true\n"},
         "dataset_config.datasets.0.subsets.0.color_aug"),
        ({"dataset_config": subset + "caption_tag_dropout_rate = 0.1\n"},
         "dataset_config.datasets.0.subsets.0.caption_tag_dropout_rate"),
        ({"dataset_config": "[general]\nbucket_no_upscale = true\n" + subset},
         "dataset_config.general.bucket_no_upscale"),
    ]
    with stack.client() as client:
        for extra, field in cases:
            response = client.post("/v1/trainings", json={
                "name": "x", "dataset_id": "any", "optim": {"max_train_steps": 1}, **extra})
            assert response.status_code == 422, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            assert field in {e["field"] for e in response.json()["errors"]}, response.json()

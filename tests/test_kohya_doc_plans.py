"""kohya's documented dataset configs, verbatim, planned over HTTP on a real dataset.

The three examples of sd-scripts' dataset-config documentation (class+identifier, captions,
fine-tuning) and its inheritance example (two ``[[datasets]]`` at different resolutions and
batch sizes) are posted as ``dataset_config`` with their ``C:\\hoge``-style paths; the
dataset's folders carry those names. Each plan must show what kohya computes per dataset:
regularisation images balanced to the training items, one bucket list per dataset, batches
that never mix buckets or datasets, and the steps that follow. The expected figures are worked
out by hand in the comments, from kohya's rules, not by calling Loomis's own bucket code.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import RunningStack, wait_terminal
from tests.test_dataset_config_upload import _lora_metadata
from tests.test_kohya import CAPTIONS_TOML, CLASS_TOKENS_TOML, FINE_TUNING_TOML, INHERITANCE_TOML

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

# folder -> image sizes; `hoge` has 3 square and 2 landscape (3:2) images, each captioned
FOLDERS = {"hoge": [(64, 64)] * 3 + [(96, 64)] * 2, "reg": [(64, 64)] * 8,
           "fuga": [(64, 64)] * 2, "piyo": [(64, 64)] * 3}


def _zip(config: str | None = None, caption_ext: str = ".caption") -> bytes:
    rng = np.random.default_rng(11)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for folder, sizes in FOLDERS.items():
            for index, (width, height) in enumerate(sizes):
                out = io.BytesIO()
                Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(out, "PNG")
                archive.writestr(f"{folder}/{index}.png", out.getvalue())
                if folder == "hoge":
                    archive.writestr(f"{folder}/{index}{caption_ext}", "hoge girl, smiling")
        if config is not None:
            archive.writestr("dataset_config.toml", config)
    return buffer.getvalue()


def _plan(client: Any, dataset_id: str, toml: str | None) -> dict[str, Any]:
    body = {"name": "doc", "dataset_id": dataset_id, "optim": {"max_train_epochs": 2}}
    response = client.post("/v1/trainings/plan", json={
        **body, **({"dataset_config": toml} if toml is not None else {})})
    assert response.status_code == 200, response.text
    plan: dict[str, Any] = response.json()
    return plan


def _buckets(plan: dict[str, Any]) -> list[tuple[int, int, int, int, int, int, int]]:
    return [(b["dataset"], b["width"], b["height"], b["images"], b["items"], b["batch_size"],
             b["batches"]) for b in plan["buckets"]]


def test_the_documentations_examples_plan_as_kohya_counts_them(stack: RunningStack) -> None:
    with stack.client() as client:
        response = client.post("/v1/datasets", data={"name": "kohya-doc", "min_side": "64"},
                               files=[("zip", ("d.zip", _zip(), "application/zip"))])
        assert response.status_code == 201, response.text
        dataset_id = response.json()["id"]

        # class+identifier: resolution 512, batch 4, buckets on (256..1024 px by 64).
        # hoge: 5 images x 10 repeats = 50 items: 3 square -> 512x512 (30 items), 2 at 3:2 ->
        # 640x384, the bucket of closest aspect (20 items). reg: 8 images are repeated until
        # they match the 50 training items (6 or 7 times each), all square. Batches of 4 per
        # bucket: 512x512 has 80 items (20 batches), 640x384 has 20 (5): 25 steps an epoch.
        plan = _plan(client, dataset_id, CLASS_TOKENS_TOML)
        assert _buckets(plan) == [(0, 512, 512, 11, 80, 4, 20), (0, 640, 384, 2, 20, 4, 5)]
        assert [(s["folder"], s["is_reg"], s["images"], s["items"]) for s in plan["subsets"]] == [
            ("hoge", False, 5, 50), ("reg", True, 8, 50)]
        assert (plan["steps_per_epoch"], plan["epochs"], plan["total_steps"]) == (25, 2, 50)
        assert plan["trigger_words"] == ["hoge girl"]  # the captions carry it

        # captions: the same images and counts; hoge is read from its .caption files, so it
        # has no class tokens and the run has no trigger word
        plan = _plan(client, dataset_id, CAPTIONS_TOML)
        assert _buckets(plan) == [(0, 512, 512, 11, 80, 4, 20), (0, 640, 384, 2, 20, 4, 5)]
        assert (plan["steps_per_epoch"], plan["total_steps"]) == (25, 50)
        assert plan["trigger_words"] == []

        # fine-tuning: no bucketing ([general] leaves enable_bucket false), so piyo's 3 images
        # are all trained at 512x512, in one batch of up to 4
        plan = _plan(client, dataset_id, FINE_TUNING_TOML)
        assert _buckets(plan) == [(0, 512, 512, 3, 3, 4, 1)]
        assert (plan["steps_per_epoch"], plan["total_steps"]) == (1, 2)

        # inheritance: dataset 0 at 512 wide x 768 high, batch 2: hoge 5 x 3 repeats + fuga
        # 2 x 1 = 17 items -> 9 batches; dataset 1 at 768x768, batch 1: piyo's 3 -> 3 batches.
        # The datasets never share a batch: 12 steps an epoch (one list of 20 items in batches
        # of 2 would have been 10).
        plan = _plan(client, dataset_id, INHERITANCE_TOML)
        assert _buckets(plan) == [(0, 512, 768, 7, 17, 2, 9), (1, 768, 768, 3, 3, 1, 3)]
        assert (plan["batches_per_epoch"], plan["steps_per_epoch"], plan["total_steps"]) == (12, 12, 24)
        # hoge reads .txt files there: kohya never opens its .caption files, and the plan says so
        assert [(w["code"], w["subset"]) for w in plan["warnings"]
                if w["code"] == "captions_unread"] == [("captions_unread", "hoge")]

        # the documentation's own Italian translation renames the tables: a 422 naming them
        translated = CLASS_TOKENS_TOML.replace("[general]", "[generale]")
        response = client.post("/v1/trainings/plan", json={
            "name": "doc", "dataset_id": dataset_id, "dataset_config": translated,
            "optim": {"max_train_epochs": 2}})
        assert response.status_code == 422
        (error,) = response.json()["errors"]
        assert error["field"] == "dataset_config.generale" and "general" in error["message"]


def test_a_zip_may_bring_the_documentations_config_with_its_own_folder_names(stack: RunningStack) -> None:
    """kohya's TOML mode takes any folder name; the upload keeps the TOML and plans with it."""
    with stack.client() as client:
        response = client.post("/v1/datasets", data={"name": "kohya-doc-zip", "min_side": "64"},
                               files=[("zip", ("d.zip", _zip(CLASS_TOKENS_TOML), "application/zip"))])
        assert response.status_code == 201, response.text
        plan = _plan(client, response.json()["id"], None)
        assert _buckets(plan) == [(0, 512, 512, 11, 80, 4, 20), (0, 640, 384, 2, 20, 4, 5)]
        wrong = CLASS_TOKENS_TOML.replace("C:\\hoge", "C:\\nowhere")
        response = client.post("/v1/datasets", data={"name": "kohya-doc-bad", "min_side": "64"},
                               files=[("zip", ("d.zip", _zip(wrong), "application/zip"))])
        assert response.status_code == 422, response.text
        (error,) = response.json()["errors"]
        assert "nowhere" in error["message"] and "hoge" in error["message"]


def test_a_subsets_caption_extension_decides_which_captions_train(stack: RunningStack) -> None:
    """kohya opens only ``<image><caption_extension>``: `.caption` files under a subset that
    reads `.txt` never reach training, which then trains on the class tokens."""
    toml = ("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'C:\\\\hoge'\n"
            "class_tokens = 'zxq cat'\ncaption_extension = '{ext}'\n")
    with stack.client() as client:
        response = client.post("/v1/datasets", data={"name": "kohya-ext", "min_side": "64"},
                               files=[("zip", ("d.zip", _zip(), "application/zip"))])
        dataset_id = response.json()["id"]
        frequencies = {}
        for ext in (".caption", ".txt"):
            response = client.post("/v1/trainings", json={
                "name": f"ext{ext.strip('.')}", "dataset_id": dataset_id,
                "dataset_config": toml.format(ext=ext), "network": {"rank": 4},
                "optim": {"max_train_steps": 1, "seed": 1}})
            assert response.status_code == 202, response.text
            job = wait_terminal(client, response.json()["id"], timeout=180)
            assert job["status"] == "succeeded", job
            metadata = _lora_metadata(stack, job["result"]["lora"]["id"])
            frequencies[ext] = (json.loads(metadata["ss_tag_frequency"]),
                                job["result"]["lora"]["trigger_words"])
        assert frequencies[".caption"] == ({"hoge": {"hoge girl": 5, "smiling": 5}}, [])
        assert frequencies[".txt"] == ({"hoge": {"zxq cat": 5}}, ["zxq cat"])


def test_a_toml_without_caption_extension_reads_the_datasets_own(stack: RunningStack) -> None:
    """The dataset's ``caption_extension`` is the run's ``--caption_extension``: a TOML that
    leaves it unset reads the `.txt` captions of a dataset uploaded with `.txt`."""
    with stack.client() as client:
        response = client.post("/v1/datasets", data={
            "name": "kohya-txt", "min_side": "64", "caption_extension": ".txt"},
            files=[("zip", ("d.zip", _zip(caption_ext=".txt"), "application/zip"))])
        assert response.status_code == 201, response.text
        dataset_id = response.json()["id"]
        unread = [w["subset"] for w in _plan(client, dataset_id, CLASS_TOKENS_TOML)["warnings"]
                  if w["code"] == "captions_unread"]
        assert unread == []
        unread = [w["subset"] for w in _plan(client, dataset_id, CAPTIONS_TOML)["warnings"]
                  if w["code"] == "captions_unread"]
        assert unread == ["hoge"]  # the TOML's own `.caption` wins, as kohya's subset key does


def test_a_missing_regularisation_dataset_is_named_as_such(stack: RunningStack) -> None:
    with stack.client() as client:
        dataset_id = client.post("/v1/datasets", data={"name": "kohya-reg", "min_side": "64"},
                                 files=[("zip", ("d.zip", _zip(), "application/zip"))]).json()["id"]
        body = {"name": "doc", "dataset_id": dataset_id, "reg_dataset_id": "nope",
                "optim": {"max_train_steps": 1}}
        for path in ("/v1/trainings/plan", "/v1/trainings"):
            response = client.post(path, json=body)
            assert response.status_code == 422, response.text
            assert [e["field"] for e in response.json()["errors"]] == ["reg_dataset_id"]


def test_a_folder_named_by_two_subsets_is_refused_not_half_applied(stack: RunningStack) -> None:
    toml = ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'C:\\\\hoge'\nnum_repeats = 2\n"
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'D:\\\\other\\\\hoge'\nflip_aug = true\n")
    with stack.client() as client:
        dataset_id = client.post("/v1/datasets", data={"name": "kohya-twice", "min_side": "64"},
                                 files=[("zip", ("d.zip", _zip(), "application/zip"))]).json()["id"]
        response = client.post("/v1/trainings/plan", json={
            "name": "doc", "dataset_id": dataset_id, "dataset_config": toml,
            "optim": {"max_train_steps": 1}})
        assert response.status_code == 422, response.text
        (error,) = response.json()["errors"]
        assert error["field"] == "dataset_config.datasets.1.subsets.0.image_dir"
        assert "hoge" in error["message"] and "datasets.0.subsets.0" in error["message"]
        response = client.post("/v1/datasets", data={"name": "kohya-twice-zip", "min_side": "64"},
                               files=[("zip", ("d.zip", _zip(toml), "application/zip"))])
        assert response.status_code == 422, response.text
        assert "hoge" in response.json()["errors"][0]["message"]

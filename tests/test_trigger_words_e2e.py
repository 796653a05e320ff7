"""The trigger-word trap: upload photos -> caption -> train gives a LoRA its trigger triggers.

In kohya a caption file replaces a DreamBooth folder's class tokens, so `300_sks person`
captioned by BLIP alone never shows "sks person" to the model. The tagging job puts the
trigger first in what it writes, and a training reports only trigger words its captions hold.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile

import httpx
import pytest

from tests.conftest import RunningStack, wait_terminal
from tests.test_datasets_e2e import image_bytes
from tests.test_taggings_e2e import items_of, tag_and_wait
from tests.test_trainings_e2e import events_of

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

FOLDER = "img/300_sks person"


def people_zip(*, own_caption: bool = True, reg: bool = True) -> bytes:
    buffer = io.BytesIO()
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    with zipfile.ZipFile(buffer, "w") as archive:
        for index, color in enumerate(colors):
            archive.writestr(f"{FOLDER}/{index}.png", image_bytes(color, (64, 64)))
        if own_caption:
            archive.writestr(f"{FOLDER}/2.caption", "my own words")
        if reg:
            archive.writestr("reg/1_person/r.png", image_bytes((128, 128, 128), (64, 64)))
    return buffer.getvalue()


def upload(client: httpx.Client, name: str, data: bytes) -> str:
    created = client.post("/v1/datasets", data={"name": name, "min_side": "64"},
                          files=[("zip", ("people.zip", data, "application/zip"))])
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def train(client: httpx.Client, dataset_id: str) -> dict:  # type: ignore[type-arg]
    response = client.post("/v1/trainings", json={
        "name": f"person-{dataset_id[:8]}", "dataset_id": dataset_id,
        "data": {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128},
        "optim": {"max_train_steps": 1, "seed": 1}})
    assert response.status_code == 202, response.text
    job = wait_terminal(client, response.json()["id"], timeout=180)
    assert job["status"] == "succeeded", job
    return job


def tag_frequency(job: dict) -> dict[str, dict[str, int]]:  # type: ignore[type-arg]
    """ss_tag_frequency of the trained LoRA: the captions the trainer was fed, split at commas."""
    data = httpx.get(next(a["url"] for a in job["artifacts"] if a["kind"] == "lora")).content
    (length,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8:8 + length])["__metadata__"]
    return json.loads(metadata["ss_tag_frequency"])  # type: ignore[no-any-return]


def test_captioning_a_dreambooth_folder_keeps_its_trigger_in_training(stack: RunningStack) -> None:
    with stack.client() as client:
        dataset_id = upload(client, "people", people_zip())
        tag_and_wait(client, {"dataset_id": dataset_id, "caption": {"max_length": 12},
                              "tags": {"general_threshold": 0.35}})
        items = items_of(client, dataset_id)
        for index in (0, 1):  # captioned and tagged here: the trigger comes first
            item = items[f"{FOLDER}/{index}.png"]
            assert item["caption"].startswith("sks person, "), item["caption"]
            assert item["tags"][0] == "sks person", item["tags"]
        assert items[f"{FOLDER}/2.png"]["caption"] == "my own words"  # uploaded: as it was
        reg = items["reg/1_person/r.png"]  # regularisation images are the class, not the subject
        assert "sks" not in reg["caption"] and "sks person" not in reg["tags"]

        job = train(client, dataset_id)
        assert job["result"]["lora"]["trigger_words"] == ["sks person"]
        frequency = tag_frequency(job)["300_sks person"]
        assert all(frequency.get(word) for word in job["result"]["lora"]["trigger_words"])
        assert frequency["sks person"] == 2  # the uploaded caption did not get it
        [warning] = job["result"]["warnings"]
        assert "1 of 3 captions" in warning and "'sks person'" in warning
        lora = client.get(f"/v1/loras/{job['result']['lora']['id']}").json()
        assert lora["info"]["trigger_words"] == ["sks person"], lora


def test_a_trigger_no_caption_holds_is_not_reported(stack: RunningStack) -> None:
    with stack.client() as client:
        dataset_id = upload(client, "people-plain", people_zip(own_caption=False, reg=False))
        tag_and_wait(client, {"dataset_id": dataset_id, "caption": {"max_length": 12},
                              "tags": None, "prefix_trigger": False})
        captions = [item["caption"] for item in items_of(client, dataset_id).values()]
        assert all(c and "sks person" not in c for c in captions), captions

        job = train(client, dataset_id)
        assert job["result"]["lora"]["trigger_words"] == []
        assert all("sks person" not in tags for tags in tag_frequency(job).values())
        [warning] = job["result"]["warnings"]
        assert "3 of 3 captions" in warning and "prefix_trigger" in warning
        said = [e["data"]["warnings"] for e in events_of(client, job["id"])
                if e["type"] == "progress" and "warnings" in e["data"]]
        assert said == [[warning]]  # while it ran, too

"""Tagger jobs end to end: a kohya zip is uploaded, captioned, tagged, cleaned and exported."""

from __future__ import annotations

import io
import json
import zipfile

import httpx
import pytest

from tests.conftest import RunningStack, wait_terminal
from tests.test_datasets_e2e import image_bytes

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def dataset_zip() -> bytes:
    buffer = io.BytesIO()
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (90, 20, 160)]
    with zipfile.ZipFile(buffer, "w") as archive:
        for index, color in enumerate(colors):
            archive.writestr(f"img/5_sks cat/{index}.png", image_bytes(color, (80, 64)))
        archive.writestr("img/5_sks cat/0.caption", "my own caption")
        archive.writestr("reg/1_cat/r.png", image_bytes((128, 128, 128), (64, 64)))
    return buffer.getvalue()


def tag_and_wait(client: httpx.Client, spec: dict) -> dict:  # type: ignore[type-arg]
    response = client.post("/v1/taggings", json=spec)
    assert response.status_code == 202, response.text
    job = wait_terminal(client, response.json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    return job


def items_of(client: httpx.Client, dataset_id: str) -> dict[str, dict]:  # type: ignore[type-arg]
    items = client.get(f"/v1/datasets/{dataset_id}/items", params={"limit": 200}).json()["items"]
    return {item["path"]: item for item in items}


def test_upload_tag_export_round_trip(stack: RunningStack) -> None:
    with stack.client() as client:
        created = client.post("/v1/datasets", data={"name": "cats"},
                              files=[("zip", ("cats.zip", dataset_zip(), "application/zip"))])
        assert created.status_code == 201, created.text
        dataset_id = created.json()["id"]
        job = tag_and_wait(client, {
            "dataset_id": dataset_id, "caption": {"batch_size": 4, "max_length": 12},
            "tags": {"batch_size": 4, "general_threshold": 0.35, "prefix": ["sks"],
                     "keep_rating": False},
            "write_caption_files": True})
        assert job["kind"] == "tagging" and job["result"]["images"] == 6
        assert job["result"]["failed"] == []
        kinds = {a["kind"] for a in job["artifacts"]}
        assert {"metadata", "results"} <= kinds
        items = items_of(client, dataset_id)
        assert items["img/5_sks cat/0.png"]["caption"] == "my own caption"  # kept, not overwritten
        for path, item in items.items():
            assert item["caption"], path  # missing captions were filled
            # the prefix token always comes first, after a DreamBooth subset's trigger
            first = ["sks cat", "sks"] if path.startswith("img/") else ["sks"]
            assert item["tags"][:len(first)] == first, item["tags"]
            assert not any(t in ("general", "sensitive", "questionable", "explicit")
                           for t in item["tags"])  # rating tags dropped
        report = client.get(f"/v1/datasets/{dataset_id}").json()["report"]
        assert report["captions"]["missing"] == 0

        export = client.get(f"/v1/datasets/{dataset_id}/export")
        with zipfile.ZipFile(io.BytesIO(export.content)) as archive:
            metadata = json.loads(archive.read("metadata.json"))
            assert set(metadata) == {f"5_sks cat/{i}" for i in range(5)}
            entry = metadata["5_sks cat/0"]
            assert entry["caption"] == "my own caption"
            assert entry["tags"].split(", ")[:2] == ["sks cat", "sks"]
            assert archive.read("img/5_sks cat/0.caption").decode().strip() == "my own caption"
        meta_url = next(a["url"] for a in job["artifacts"] if a["kind"] == "metadata")
        worker_metadata = httpx.get(meta_url).json()
        assert worker_metadata["img/5_sks cat/0"]["caption"] == "my own caption"
        assert "datasets/" in stack.s3_keys("datasets/")[0]
        assert any(k.endswith("img/5_sks cat/1.caption") for k in stack.s3_keys("datasets/"))


def test_thresholds_move_the_tag_set_and_one_bad_image_loses_nothing(stack: RunningStack) -> None:
    with stack.client() as client:
        dataset_id = client.post("/v1/datasets", data={"name": "cats2"}, files=[
            ("zip", ("c.zip", dataset_zip(), "application/zip"))]).json()["id"]
        counts = {}
        for threshold in (0.05, 0.5, 0.95):
            tag_and_wait(client, {"dataset_id": dataset_id, "caption": None, "clean": None,
                                  "tags": {"general_threshold": threshold,
                                           "character_threshold": threshold}})
            counts[threshold] = sum(len(i["tags"]) for i in items_of(client, dataset_id).values())
        assert counts[0.05] >= counts[0.5] >= counts[0.95]
        assert counts[0.05] > counts[0.95]

        # Corrupt one stored image behind the API's back: its item reports the error, the
        # others still get their results.
        items = items_of(client, dataset_id)
        victim = items["img/5_sks cat/3.png"]
        key = next(k for k in stack.s3_keys("datasets/") if k.endswith(f"{dataset_id}/img/5_sks cat/3.png"))
        stack.s3.client().put_object(Bucket=stack.bucket, Key=key, Body=b"not a png")
        job = tag_and_wait(client, {"dataset_id": dataset_id, "caption": {"overwrite": True},
                                    "tags": None})
        assert [f["item"] for f in job["result"]["failed"]] == [victim["id"]]
        after = items_of(client, dataset_id)
        assert after["img/5_sks cat/3.png"]["error"]
        assert after["img/5_sks cat/0.png"]["caption"] != "my own caption"  # overwritten
        assert all(i["caption"] for p, i in after.items() if p != "img/5_sks cat/3.png")
        missing = client.post("/v1/taggings", json={"dataset_id": "nope"})
        assert missing.status_code == 404
        nothing = client.post("/v1/taggings", json={"dataset_id": dataset_id, "caption": None,
                                                    "tags": None, "clean": None})
        assert nothing.status_code == 422

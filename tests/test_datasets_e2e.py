"""Datasets over HTTP: kohya zips and loose files in, reports and items out, kohya export."""

from __future__ import annotations

import io
import json
import stat
import zipfile

import httpx
import pytest
from PIL import Image

from tests.conftest import RunningStack
from tests.test_modes_e2e import _bomb_png

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def image_bytes(color: tuple[int, int, int], size: tuple[int, int] = (96, 64),
                fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def kohya_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("img/10_sks dog/a.png", image_bytes((200, 10, 10)))
        archive.writestr("img/10_sks dog/a.caption", "a photo of sks dog\n")
        archive.writestr("img/10_sks dog/b.jpg", image_bytes((10, 200, 10), (64, 96), "JPEG"))
        archive.writestr("img/10_sks dog/dup.png", image_bytes((200, 10, 10)))  # same as a.png
        archive.writestr("reg/1_dog/r.png", image_bytes((10, 10, 200), (600, 600)))
        archive.writestr("__MACOSX/._a.png", b"junk")
    return buffer.getvalue()


def test_kohya_zip_round_trips_with_report_items_and_export(stack: RunningStack) -> None:
    with stack.client() as client:
        response = client.post("/v1/datasets", data={"name": "dogs"},
                               files=[("zip", ("dogs.zip", kohya_zip(), "application/zip"))])
        assert response.status_code == 201, response.text
        dataset = response.json()
        report = dataset["report"]
        subsets = {s["name"]: s for s in report["subsets"]}
        assert subsets["10_sks dog"]["repeats"] == 10 and subsets["10_sks dog"]["images"] == 2
        assert subsets["10_sks dog"]["identifier"] == "sks" and not subsets["10_sks dog"]["is_reg"]
        assert subsets["1_dog"]["is_reg"] and subsets["1_dog"]["images"] == 1
        assert len(dataset["upload"]["duplicates"]) == 1
        assert report["totals"]["images"] == 3

        items = client.get(f"/v1/datasets/{dataset['id']}/items").json()["items"]
        by_name = {i["filename"]: i for i in items}
        assert by_name["a.png"]["caption"] == "a photo of sks dog"
        assert by_name["b.jpg"]["caption"] is None and "small" in by_name["b.jpg"]["flags"]
        assert "small" not in by_name["r.png"]["flags"]
        thumb = Image.open(io.BytesIO(httpx.get(by_name["a.png"]["thumbnail_url"]).content))
        assert max(thumb.size) <= 256
        page = client.get(f"/v1/datasets/{dataset['id']}/items", params={"limit": 2}).json()
        rest = client.get(f"/v1/datasets/{dataset['id']}/items",
                          params={"limit": 2, "cursor": page["next_cursor"]}).json()
        assert len(page["items"]) == 2 and len(rest["items"]) == 1 and rest["next_cursor"] is None

        patched = client.patch(f"/v1/datasets/{dataset['id']}/items/{by_name['b.jpg']['id']}",
                               json={"caption": "sks dog  running", "tags": ["dog", "grass", "dog"]})
        assert patched.status_code == 200
        assert patched.json()["caption"] == "sks dog running"
        assert patched.json()["tags"] == ["dog", "grass"]

        export = client.get(f"/v1/datasets/{dataset['id']}/export")
        assert export.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(export.content)) as archive:
            names = set(archive.namelist())
            assert {"img/10_sks dog/a.png", "img/10_sks dog/a.caption", "img/10_sks dog/b.jpg",
                    "img/10_sks dog/b.caption", "reg/1_dog/r.png", "metadata.json",
                    "dataset_config.toml"} <= names
            metadata = json.loads(archive.read("metadata.json"))
            assert metadata == {"10_sks dog/a": {"caption": "a photo of sks dog"},
                                "10_sks dog/b": {"caption": "sks dog running",
                                                 "tags": "dog, grass"}}
            assert archive.read("img/10_sks dog/b.caption").decode().strip() == "sks dog running"
            assert archive.read("img/10_sks dog/a.png") == image_bytes((200, 10, 10))


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return buffer.getvalue()


def test_rejected_uploads_are_problems_and_store_nothing(stack: RunningStack) -> None:
    link = zipfile.ZipInfo("img/1_x y/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    cases = [
        ([("files", ("notes.pdf", b"%PDF-1.4 not an image", "application/pdf"))], "files"),
        ([("files", ("a.png", b"\x89PNG\r\n\x1a\ncorrupt", "image/png"))], "files"),
        ([("files", ("bomb.png", _bomb_png(), "image/png"))], "files"),
        ([("zip", ("z.zip", _zip([("../evil.png", image_bytes((1, 2, 3)))]), "application/zip"))],
         "zip"),
        ([("zip", ("z.zip", _zip([("/abs.png", image_bytes((1, 2, 3)))]), "application/zip"))],
         "zip"),
        ([("zip", ("z.zip", _zip([(link, b"/etc/passwd")]), "application/zip"))], "zip"),
        ([("zip", ("z.zip", b"PK\x03\x04 not really", "application/zip"))], "zip"),
    ]
    stored_before = stack.s3_keys("datasets/")
    with stack.client("bob") as client:
        for parts, field in cases:
            response = client.post("/v1/datasets", data={"name": "bad"}, files=parts)
            assert 400 <= response.status_code < 500, (field, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            assert any(e["field"].startswith(field) for e in response.json()["errors"]), \
                response.json()
        assert client.get("/v1/datasets").json()["items"] == []
    assert stack.s3_keys("datasets/") == stored_before

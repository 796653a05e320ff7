"""Parameter sweeps: every cell, a labelled contact sheet and per-cell metadata."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import RunningStack, wait_terminal
from tests.test_modes_e2e import BASE, images_of, run

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def test_two_axis_sweep_makes_grid_sheet_and_metadata(stack: RunningStack) -> None:
    sweep = {"base": {**BASE, "steps": 2},
             "axes": [{"param": "guidance_scale", "values": [2, 5, 7.5]},
                      {"param": "seed", "values": [42, 123]}],
             "title": "guidance x seed"}
    with stack.client() as client:
        response = client.post("/v1/sweeps", json=sweep)
        assert response.status_code == 202, response.text
        job = wait_terminal(client, response.json()["id"], timeout=120)
        assert job["status"] == "succeeded", job
        assert job["kind"] == "sweep"
        kinds = [a["kind"] for a in job["artifacts"]]
        assert kinds.count("image") == 6 and {"contact_sheet", "metadata", "manifest"} <= set(kinds)
        meta = httpx.get(next(a["url"] for a in job["artifacts"] if a["kind"] == "metadata")).json()
        assert meta["columns"] == 3 and meta["rows"] == 2
        by_index = {cell["index"]: cell for cell in meta["cells"]}
        assert by_index[4]["labels"] == {"guidance_scale": 5, "seed": 123}
        assert by_index[4]["spec"]["guidance_scale"] == 5 and by_index[4]["spec"]["seed"] == 123
        assert by_index[4]["spec"]["steps"] == 2  # each cell's spec is complete
        assert by_index[4]["spec"]["scheduler"] == "Euler"  # the model's own, as it ran
        sheet_ref = next(a for a in job["artifacts"] if a["kind"] == "contact_sheet")
        sheet = Image.open(io.BytesIO(httpx.get(sheet_ref["url"]).content))
        # 3 columns x 2 rows of 64 px cells plus label margins.
        assert sheet.width > 3 * 64 and sheet.height > 2 * 64
        assert sheet.width < 3 * 64 + 400 and sheet.height < 2 * 64 + 200
        # A cell reproduces as a plain generation with its recorded spec.
        cell_png = next(a for a in job["artifacts"] if a["kind"] == "image" and a["index"] == 4)
        single = images_of(run(client, by_index[4]["spec"]))[0]
        cell = np.asarray(Image.open(io.BytesIO(httpx.get(cell_png["url"]).content)).convert("RGB"))
        assert np.array_equal(single, cell)


def test_one_axis_sweep_and_bad_sweeps(stack: RunningStack) -> None:
    with stack.client() as client:
        response = client.post("/v1/sweeps", json={
            "base": {**BASE, "steps": 2}, "axes": [{"param": "scheduler",
                                                    "values": ["Euler", "DDIM"]}]})
        job = wait_terminal(client, response.json()["id"], timeout=120)
        assert job["status"] == "succeeded", job
        assert job["result"]["rows"] == 1 and job["result"]["columns"] == 2
        bad = [
            ({"base": BASE, "axes": [{"param": "guidance_scale", "values": [5, 99]}]},
             "axes.0.values.1"),
            ({"base": BASE, "axes": [{"param": "seed", "values": [1]},
                                     {"param": "scheduler", "values": ["Euler", "Nope"]}]},
             "axes.1.values.1"),
            ({"base": BASE, "axes": [{"param": "seed", "values": list(range(9))},
                                     {"param": "steps", "values": list(range(1, 9))}]}, "axes"),
            ({"base": BASE, "axes": [{"param": "width", "values": [64]}]}, "axes.0.param"),
        ]
        before = len(client.get("/v1/jobs", params={"kind": "sweep"}).json()["items"])
        for body, field in bad:
            response = client.post("/v1/sweeps", json=body)
            assert response.status_code == 422, response.text
            assert any(e["field"].startswith(field) for e in response.json()["errors"]), \
                (field, response.json())
        assert len(client.get("/v1/jobs", params={"kind": "sweep"}).json()["items"]) == before

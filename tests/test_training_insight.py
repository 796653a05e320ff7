"""Seeing a training run: its plan before it starts, its metrics and loss curve as it goes."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import RunningStack, wait_terminal

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

BUCKETS = {"resolution": 128, "batch_size": 2, "enable_bucket": True, "min_bucket_reso": 64,
           "max_bucket_reso": 128, "bucket_reso_steps": 64}


def two_bucket_zip() -> bytes:
    """Three square and two tall images in ``2_sks dog``; one caption lacks the trigger."""
    rng = np.random.default_rng(5)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index, (width, height) in enumerate([(128, 128)] * 3 + [(64, 128)] * 2):
            pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="PNG")
            archive.writestr(f"img/2_sks dog/{index}.png", out.getvalue())
        archive.writestr("img/2_sks dog/0.txt", "a dog on the grass")
    return buffer.getvalue()


def _dataset(client: httpx.Client) -> str:
    response = client.post("/v1/datasets", data={"name": "dogs", "min_side": "64"}, files=[
        ("zip", ("d.zip", two_bucket_zip(), "application/zip"))])
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_plan_shows_the_run_the_training_then_makes(stack: RunningStack) -> None:
    with stack.client() as client:
        body: dict[str, Any] = {
            "name": "planned", "base_model": "tiny-sd15", "dataset_id": _dataset(client),
            "data": BUCKETS, "network": {"rank": 4, "alpha": 4},
            "optim": {"learning_rate": 0.005, "max_train_epochs": 1, "seed": 1},
            "save": {"every_n_steps": 3}}
        response = client.post("/v1/trainings/plan", json=body)
        assert response.status_code == 200, response.text
        plan = response.json()
        assert plan["subsets"] == [{"folder": "2_sks dog", "is_reg": False, "images": 5,
                                    "num_repeats": 2, "items": 10, "class_tokens": "sks dog"}]
        assert [(b["width"], b["height"], b["images"], b["items"], b["batches"])
                for b in plan["buckets"]] == [(64, 128, 2, 4, 2), (128, 128, 3, 6, 3)]
        assert (plan["batches_per_epoch"], plan["steps_per_epoch"], plan["epochs"],
                plan["total_steps"]) == (5, 5, 1, 5)
        assert plan["trigger_words"] == ["sks dog"]
        assert [(w["code"], w["subset"]) for w in plan["warnings"]] == [
            ("trigger_missing", "2_sks dog")]
        assert not any(job["spec"].get("name") == "planned"
                       for job in client.get("/v1/jobs").json()["items"])  # nothing ran

        bad = client.post("/v1/trainings/plan", json={**body, "base_model": "nope"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "base_model"

        job_id = client.post("/v1/trainings", json=body).json()["id"]
        job = wait_terminal(client, job_id, timeout=180)
        assert job["status"] == "succeeded", job
        assert job["result"]["steps"] == plan["total_steps"]

        metrics = client.get(f"/v1/trainings/{job_id}/metrics")
        assert metrics.status_code == 200, metrics.text
        steps = metrics.json()["steps"]
        assert [s["step"] for s in steps] == list(range(1, plan["total_steps"] + 1))
        for entry in steps:
            assert np.isfinite(entry["loss"]) and np.isfinite(entry["avr_loss"])
            assert entry["lr"] == pytest.approx(0.005) and entry["step_time_s"] > 0
        assert metrics.json()["total_steps"] == plan["total_steps"]

        artifacts = {a["kind"]: a for a in job["artifacts"]}
        curve = httpx.get(artifacts["loss_curve"]["url"])
        assert curve.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(curve.content))
        image.verify()
        assert image.format == "PNG" and image.size == (800, 400)
        stored = httpx.get(artifacts["metrics"]["url"]).json()["steps"]
        assert [s["step"] for s in stored] == [s["step"] for s in steps]
        assert [s["loss"] for s in stored] == [s["loss"] for s in steps]
        # the curve is also kept at a checkpoint, before the run ends
        assert any(k.endswith("/loss_curve.png") for k in stack.s3_keys("training/"))

        other = client.get("/v1/trainings/nope/metrics")
        assert other.status_code == 404 and other.json()["code"] == "job_not_found"
    with stack.client("bob") as client:
        assert client.get(f"/v1/trainings/{job_id}/metrics").status_code == 404


def test_plan_and_metrics_are_documented_field_by_field(stack: RunningStack) -> None:
    with stack.client() as client:
        spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert "post" in paths["/v1/trainings/plan"]
    assert "get" in paths["/v1/trainings/{job_id}/metrics"]
    schemas = spec["components"]["schemas"]
    for name in ("TrainingPlan", "PlanSubset", "PlanBucket", "PlanWarning", "TrainingMetrics",
                 "StepMetrics"):
        for field, prop in schemas[name]["properties"].items():
            assert prop.get("description"), f"{name}.{field} has no description"

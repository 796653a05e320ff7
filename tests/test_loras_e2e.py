"""LoRA adapters end to end: upload (safetensors only, family-checked), use, switch, delete."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import RunningStack
from tests.lora_files import make_lora, make_pickle_lora
from tests.test_loras import fake_lora
from tests.test_modes_e2e import BASE, images_of, run

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def upload_lora(client: httpx.Client, data: bytes, *, name: str, base_model: str = "tiny-sd15",
                filename: str = "adapter.safetensors") -> httpx.Response:
    return client.post("/v1/loras", data={"base_model": base_model, "name": name},
                       files={"file": (filename, data, "application/octet-stream")})


def test_lora_weights_switching_and_unloading(stack: RunningStack, model_cache: Path) -> None:
    with stack.client() as client:
        peft = upload_lora(client, make_lora("sd15", cache_dir=model_cache, seed=1), name="style")
        assert peft.status_code == 201, peft.text
        assert peft.json()["format"] == "peft" and peft.json()["family"] == "sd15"
        kohya = upload_lora(client, make_lora("sd15", cache_dir=model_cache, seed=2, fmt="kohya"),
                            name="subject")
        assert kohya.status_code == 201 and kohya.json()["format"] == "kohya"
        style, subject = peft.json()["id"], kohya.json()["id"]

        base = images_of(run(client, BASE))[0]
        weight0 = run(client, {**BASE, "loras": [{"id": style, "weight": 0.0}]})
        assert np.array_equal(images_of(weight0)[0], base)
        styled_job = run(client, {**BASE, "loras": [{"id": style, "weight": 1.0}]})
        styled = images_of(styled_job)[0]
        assert not np.array_equal(styled, base)
        assert styled_job["result"]["loras"][0]["weight"] == 1.0
        both = images_of(run(client, {**BASE, "loras": [{"id": style, "weight": 1.0},
                                                        {"id": subject, "weight": 0.8}]}))[0]
        assert not np.array_equal(both, styled)
        # Switching back to one adapter reproduces it exactly: nothing was fused or reloaded.
        assert np.array_equal(images_of(run(client, {**BASE, "loras": [{"id": style}]}))[0], styled)
        # And without LoRAs the base output is bit-identical to before any was loaded.
        assert np.array_equal(images_of(run(client, BASE))[0], base)

        listed = client.get("/v1/loras").json()["items"]
        assert {lora["id"] for lora in listed} >= {style, subject}
        assert client.get(f"/v1/loras/{style}").json()["name"] == "style"
        with stack.client("bob") as bob:
            assert bob.get(f"/v1/loras/{style}").status_code == 404
            other = bob.post("/v1/generations", json={**BASE, "loras": [{"id": style}]})
            assert other.status_code == 422 and other.json()["errors"][0]["field"] == "loras.0.id"
        # Same family, other layer widths (a tiny-sd15 LoRA on real SD1.5): refused up front.
        wide = client.post("/v1/generations", json={**BASE, "model": "sd15",
                                                    "loras": [{"id": style}]})
        assert wide.status_code == 422 and "layer width" in wide.json()["errors"][0]["message"]
        assert client.delete(f"/v1/loras/{subject}").status_code == 204
        assert client.get(f"/v1/loras/{subject}").status_code == 404
        gone = client.post("/v1/generations", json={**BASE, "loras": [{"id": subject}]})
        assert gone.status_code == 422


def test_a_deleted_lora_leaves_the_workers_cache(stack: RunningStack, model_cache: Path) -> None:
    data = make_lora("sd15", cache_dir=model_cache, seed=7)
    cached = model_cache / "loras" / f"{hashlib.sha256(data).hexdigest()}.safetensors"
    with stack.client() as client:
        uploaded = upload_lora(client, data, name="forget-me")
        assert uploaded.status_code == 201, uploaded.text
        lora_id = uploaded.json()["id"]
        job = run(client, {**BASE, "loras": [{"id": lora_id}]})
        assert job["status"] == "succeeded", job
        assert cached.exists()  # the worker keeps the file for the next job

        assert client.delete(f"/v1/loras/{lora_id}").status_code == 204
        deadline = time.monotonic() + 10
        while cached.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not cached.exists()
        gone = client.post("/v1/generations", json={**BASE, "loras": [{"id": lora_id}]})
        assert gone.status_code == 422 and gone.json()["errors"][0]["field"] == "loras.0.id"
        sweep = client.post("/v1/sweeps", json={"base": {**BASE, "loras": [{"id": lora_id}]},
                                                "axes": [{"param": "seed", "values": [1, 2]}]})
        assert sweep.status_code == 422
        assert sweep.json()["errors"][0]["field"] == "base.loras.0.id"


def test_bad_lora_uploads_are_refused(stack: RunningStack, model_cache: Path) -> None:
    with stack.client() as client:
        before = client.get("/v1/loras").json()["items"]
        pickle = upload_lora(client, make_pickle_lora(), name="p", filename="adapter.ckpt")
        assert pickle.status_code == 422
        assert pickle.headers["content-type"].startswith("application/problem+json")
        assert pickle.json()["code"] == "pickle_refused"
        assert pickle.json()["errors"][0]["field"] == "file"
        sdxl = upload_lora(client, make_lora("sdxl", cache_dir=model_cache), name="x")
        assert sdxl.status_code == 422 and sdxl.json()["code"] == "wrong_family", sdxl.text
        junk = upload_lora(client, b"\x00" * 64, name="junk")
        assert junk.status_code == 422 and junk.json()["code"] == "not_safetensors"
        unknown = upload_lora(client, make_lora("sd15", cache_dir=model_cache), name="u",
                              base_model="nope")
        assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "base_model"
        assert client.get("/v1/loras").json()["items"] == before
        # A LoRA of another family cannot be used with this model either.
        ok = upload_lora(client, make_lora("sdxl", cache_dir=model_cache), name="xl",
                         base_model="tiny-sdxl")
        assert ok.status_code == 201, ok.text
        mixed = client.post("/v1/generations", json={**BASE, "loras": [{"id": ok.json()["id"]}]})
        assert mixed.status_code == 422 and "sdxl" in mixed.json()["errors"][0]["message"]
        # On its own family it applies: weight 1 changes the output, weight 0 does not.
        xl = {**BASE, "model": "tiny-sdxl", "steps": 2}
        base = images_of(run(client, xl))[0]
        styled = images_of(run(client, {**xl, "loras": [{"id": ok.json()["id"]}]}))[0]
        off = images_of(run(client, {**xl, "loras": [{"id": ok.json()["id"], "weight": 0}]}))[0]
        assert not np.array_equal(styled, base) and np.array_equal(off, base)


# Real SD1.5 shapes (hand-made headers): neither file has a cross-attention to_k/to_v, the one
# layer the upload check used to compare, so both were accepted for tiny-sd15 and failed in
# the worker with "size mismatch".
SD15_SELF_ATTENTION = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (640, 640)}
SD15_TEXT_ENCODER = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (768, 768)}


def test_layer_widths_are_checked_at_submission_both_ways(stack: RunningStack,
                                                           model_cache: Path) -> None:
    with stack.client() as client:
        for modules in (SD15_SELF_ATTENTION, SD15_TEXT_ENCODER):
            refused = upload_lora(client, fake_lora(modules), name="wide")
            assert refused.status_code == 422 and refused.json()["code"] == "wrong_family"
            assert refused.json()["errors"][0]["field"] == "file"
            real = upload_lora(client, fake_lora(modules), name="real-sd15", base_model="sd15")
            assert real.status_code == 201, real.text
            lora_id = real.json()["id"]
            tiny = client.post("/v1/generations", json={**BASE, "loras": [{"id": lora_id}]})
            assert tiny.status_code == 422, tiny.text
            error = tiny.json()["errors"][0]
            assert error["field"] == "loras.0.id" and "tiny-sd15 does not have" in error["message"]
            sweep = client.post("/v1/sweeps", json={
                "base": {**BASE, "loras": [{"id": lora_id}]},
                "axes": [{"param": "seed", "values": [1, 2]}]})
            assert sweep.status_code == 422
            assert sweep.json()["errors"][0]["field"] == "base.loras.0.id"
        # The other way: a tiny-sd15 LoRA without cross-attention layers on real SD1.5.
        small = upload_lora(client, fake_lora({
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64)}),
            name="small")
        assert small.status_code == 201, small.text
        assert small.json()["info"]["widths"] == {"unet": [64]}
        wide = client.post("/v1/generations", json={**BASE, "model": "sd15",
                                                    "loras": [{"id": small.json()["id"]}]})
        assert wide.status_code == 422 and wide.json()["errors"][0]["field"] == "loras.0.id"
        assert "64 wide" in wide.json()["errors"][0]["message"]


def test_lora_names_follow_the_rule(stack: RunningStack, model_cache: Path) -> None:
    data = make_lora("sd15", cache_dir=model_cache)
    with stack.client() as client:
        for bad in ("../../etc/passwd", "bell\x07", "tab\there", ".hidden", "x" * 65, "two words",
                    "ünïcode"):
            response = upload_lora(client, data, name=bad)
            assert response.status_code == 422, (bad, response.text)
            assert [e["field"] for e in response.json()["errors"]] == ["name"], bad
            assert "64 characters" in response.json()["errors"][0]["message"]
        assert upload_lora(client, data, name="Style_v1.2-final").json()["name"] == "Style_v1.2-final"
        # Without a name, the file's name is made to fit the rule.
        response = client.post("/v1/loras", data={"base_model": "tiny-sd15"}, files={
            "file": ("../My Style (v2).safetensors", data, "application/octet-stream")})
        assert response.status_code == 201 and response.json()["name"] == "My_Style_v2_"
        response = upload_lora(client, data, name="", filename=".safetensors")
        assert response.status_code == 201 and response.json()["name"] == "safetensors"

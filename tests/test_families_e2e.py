"""SDXL- and Flux-shaped tiny models through every mode, schedulers, and prompt weighting."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import RunningStack
from tests.test_control_e2e import shapes_image
from tests.test_modes_e2e import BASE, gradient, images_of, run, upload

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

RECT = {"shapes": [{"type": "rect", "x": 8, "y": 8, "width": 32, "height": 32}]}


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_family_runs_every_mode(stack: RunningStack, model: str) -> None:
    spec = {**BASE, "model": model, "steps": 2}
    with stack.client() as client:
        init = upload(client, gradient(64, 64))
        control = upload(client, shapes_image())
        txt = run(client, spec)
        first = images_of(txt)[0]
        assert first.shape == (64, 64, 3)
        assert np.array_equal(images_of(run(client, spec))[0], first)
        assert images_of(run(client, {**spec, "mode": "img2img", "init_image": init,
                                      "strength": 0.6}))[0].shape == (64, 64, 3)
        inpaint = run(client, {**spec, "mode": "inpaint", "init_image": init, "mask": RECT})
        out = images_of(inpaint)[0]
        assert np.array_equal(out[40:, :], np.asarray(gradient(64, 64))[40:, :])
        controlled = run(client, {**spec, "controls": [{"type": "canny", "image": control},
                                                       {"type": "depth", "image": control,
                                                        "scale": 0.5, "end": 0.5}]})
        assert "ControlNet" in controlled["result"]["pipeline"], controlled["result"]
        assert not np.array_equal(images_of(controlled)[0], first)


def test_family_limits_and_schedulers_are_checked_at_the_gateway(stack: RunningStack) -> None:
    with stack.client() as client:
        for name in ("Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC", "Heun",
                     "LMS", "PNDM"):
            job = run(client, {**BASE, "steps": 3, "scheduler": name})
            assert job["status"] == "succeeded", (name, job["error"])
            assert job["result"]["scheduler"] == name
        bad = [
            ({**BASE, "model": "tiny-flux", "scheduler": "DDIM"}, "scheduler"),
            ({**BASE, "scheduler": "FlowMatch Euler"}, "scheduler"),
            ({**BASE, "model": "sdxl", "width": 128}, "width"),
            ({**BASE, "model": "flux-schnell", "steps": 20}, "steps"),
        ]
        for spec, field in bad:
            response = client.post("/v1/generations", json=spec)
            assert response.status_code == 422, response.text
            assert response.json()["errors"][0]["field"] == field


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_weighted_and_long_prompts(stack: RunningStack, model: str) -> None:
    spec = {**BASE, "model": model, "steps": 2}
    long_tail = "a harbour at dawn, " * 12  # ~230 characters: > 77 tokens even for real CLIP
    with stack.client() as client:
        plain = run(client, {**spec, "prompt": "a fox"})
        assert plain["result"].get("prompt_encoding", "plain") == "plain"
        weighted = run(client, {**spec, "prompt": "a (fox:1.0)"})
        assert weighted["result"]["prompt_encoding"] == "weighted"
        # Our chunked encoder matches diffusers' own to float rounding (1e-6).
        diff = images_of(weighted)[0].astype(int) - images_of(plain)[0].astype(int)
        assert np.abs(diff).max() <= 2
        heavier = run(client, {**spec, "prompt": "a (fox:1.6)"})
        assert not np.array_equal(images_of(heavier)[0], images_of(plain)[0])
        tail_a = run(client, {**spec, "prompt": long_tail + "red boats"})
        tail_b = run(client, {**spec, "prompt": long_tail + "blue kites"})
        assert not np.array_equal(images_of(tail_a)[0], images_of(tail_b)[0])  # not truncated

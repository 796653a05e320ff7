"""ControlNet end to end: single and multi, with txt2img/img2img/inpaint, and the preview API."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import RunningStack
from tests.test_modes_e2e import BASE, gradient, images_of, run, upload

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

POSE = {"canvas_width": 64, "canvas_height": 64, "people": [{"pose_keypoints_2d": [
    32, 10, 1, 32, 18, 1, 26, 18, 1, 22, 28, 1, 20, 36, 1, 38, 18, 1, 42, 28, 1, 44, 36, 1,
    28, 38, 1, 28, 50, 1, 28, 62, 1, 36, 38, 1, 36, 50, 1, 36, 62, 1, 30, 8, 1, 34, 8, 1,
    28, 9, 1, 36, 9, 1]}]}


def shapes_image() -> Image.Image:
    image = Image.new("RGB", (64, 64), "black")
    draw = ImageDraw.Draw(image)
    draw.rectangle((12, 12, 40, 40), fill="white")
    draw.ellipse((36, 30, 60, 54), fill=(200, 60, 60))
    return image


def test_controlnet_scale_zero_equals_no_control_and_scale_one_differs(stack: RunningStack) -> None:
    with stack.client() as client:
        ref = upload(client, shapes_image())
        plain = images_of(run(client, BASE))[0]
        zero = run(client, {**BASE, "controls": [{"type": "canny", "image": ref, "scale": 0.0}]})
        assert zero["result"]["pipeline"] == "StableDiffusionControlNetPipeline"
        assert np.abs(images_of(zero)[0].astype(int) - plain.astype(int)).max() <= 1
        one = images_of(run(client, {**BASE, "controls": [{"type": "canny", "image": ref}]}))[0]
        assert np.abs(one.astype(int) - plain.astype(int)).max() > 10
        again = images_of(run(client, {**BASE, "controls": [{"type": "canny", "image": ref}]}))[0]
        assert np.array_equal(one, again)


def test_multi_controlnet_with_modes_and_own_schedules(stack: RunningStack) -> None:
    with stack.client() as client:
        ref = upload(client, shapes_image())
        init = upload(client, gradient(64, 64))
        controls = [
            {"type": "canny", "image": ref, "scale": 0.8, "low_threshold": 50,
             "high_threshold": 150},
            {"type": "openpose", "keypoints": POSE, "scale": 1.2, "start": 0.0, "end": 0.5},
            {"type": "scribble", "image": ref, "scale": 0.5, "start": 0.3},
            {"type": "depth", "image": ref, "scale": 0.7},
        ]
        multi = run(client, {**BASE, "controls": controls})
        assert multi["result"]["pipeline"] == "StableDiffusionControlNetPipeline"
        assert images_of(multi)[0].shape == (64, 64, 3)
        # Each control's own schedule reaches the pipeline: a different end changes pixels.
        shifted = [dict(c) for c in controls]
        shifted[1]["end"] = 1.0
        assert not np.array_equal(images_of(multi)[0], images_of(run(
            client, {**BASE, "controls": shifted}))[0])
        img2img = run(client, {**BASE, "mode": "img2img", "init_image": init,
                               "controls": controls[:2]})
        assert img2img["result"]["pipeline"] == "StableDiffusionControlNetImg2ImgPipeline"
        inpaint = run(client, {**BASE, "mode": "inpaint", "init_image": init, "controls": controls[:1],
                               "mask": {"shapes": [{"type": "rect", "x": 0, "y": 0, "width": 32,
                                                    "height": 64}]}})
        assert inpaint["result"]["pipeline"] == "StableDiffusionControlNetInpaintPipeline"
        out = images_of(inpaint)[0]
        assert np.array_equal(out[:, 32:], np.asarray(gradient(64, 64))[:, 32:])


def test_preprocess_preview_returns_the_control_image(stack: RunningStack) -> None:
    with stack.client() as client:
        ref = upload(client, shapes_image())
        response = client.post("/v1/control/preprocess", json={"type": "canny", "image": ref})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        edges = np.asarray(Image.open(io.BytesIO(response.content)).convert("L"))
        assert edges.shape == (64, 64)
        # Edges on the square's top border, none inside it.
        assert edges[10:15, 20].max() == 255 and edges[20:32, 20:32].max() == 0
        reuse = response.headers["loomis-upload-ref"]
        as_ready = run(client, {**BASE, "controls": [{"type": "canny", "image": reuse,
                                                     "preprocess": False}]})
        from_photo = run(client, {**BASE, "controls": [{"type": "canny", "image": ref}]})
        assert np.array_equal(images_of(as_ready)[0], images_of(from_photo)[0])

        pose = client.post("/v1/control/preprocess", json={"type": "openpose", "keypoints": POSE})
        assert pose.status_code == 200
        drawn = np.asarray(Image.open(io.BytesIO(pose.content)).convert("RGB"))
        assert drawn.shape == (64, 64, 3) and drawn[18, 32].sum() > 0 and drawn[60, 5].sum() == 0

        depth = client.post("/v1/control/preprocess", json={"type": "depth", "image": ref})
        assert depth.status_code == 200
        photo_pose = client.post("/v1/control/preprocess", json={"type": "openpose", "image": ref})
        assert photo_pose.status_code == 422
        assert "controlnet-aux" in photo_pose.json()["errors"][0]["message"]
        unknown = client.post("/v1/control/preprocess", json={"type": "hed", "image": ref})
        assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "type"

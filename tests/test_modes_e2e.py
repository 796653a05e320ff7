"""img2img, inpainting and outpainting end to end through HTTP on the tiny SD1.5 model."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import RunningStack, wait_terminal

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

BASE = {"prompt": "a quiet harbour", "model": "tiny-sd15", "steps": 3, "seed": 11}


def gradient(width: int = 64, height: int = 64) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)),
                          np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 128, np.float32)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def upload(client: httpx.Client, image: Image.Image) -> str:
    response = client.post("/v1/uploads", files={"file": ("in.png", png_bytes(image), "image/png")})
    assert response.status_code == 201, response.text
    return str(response.json()["ref"])


def images_of(job: dict) -> list[np.ndarray]:  # type: ignore[type-arg]
    assert job["status"] == "succeeded", job
    out = []
    for artifact in sorted((a for a in job["artifacts"] if a["kind"] == "image"),
                           key=lambda a: a["index"]):
        response = httpx.get(artifact["url"])
        out.append(np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")))
    return out


def run(client: httpx.Client, spec: dict) -> dict:  # type: ignore[type-arg]
    response = client.post("/v1/generations", json=spec)
    assert response.status_code == 202, response.text
    return wait_terminal(client, response.json()["id"])


def test_img2img_from_upload_and_from_earlier_job(stack: RunningStack) -> None:
    with stack.client() as client:
        ref = upload(client, gradient(80, 64))
        job = run(client, {**BASE, "mode": "img2img", "init_image": ref, "strength": 0.5})
        first = images_of(job)[0]
        assert first.shape == (64, 80, 3)  # defaults to the init image's size
        assert job["spec"]["strength"] == 0.5 and job["result"]["pipeline"].endswith("Img2ImgPipeline")
        again = images_of(run(client, {**BASE, "mode": "img2img", "init_image": ref,
                                       "strength": 0.5}))[0]
        assert np.array_equal(first, again)  # deterministic for a fixed seed
        stronger = images_of(run(client, {**BASE, "mode": "img2img", "init_image": ref,
                                          "strength": 1.0}))[0]
        assert not np.array_equal(stronger, first)  # strength reaches the pipeline
        manifest_url = next(a["url"] for a in job["artifacts"] if a["kind"] == "manifest")
        manifest = httpx.get(manifest_url).json()
        assert manifest["pipeline"] == "StableDiffusionImg2ImgPipeline"
        assert set(manifest["inputs"]) == {"init_image"}
        assert set(manifest["model"]["options"]) >= {"attention_slicing", "vae_slicing",
                                                     "vae_tiling", "cpu_offload", "dtype"}
        chained = run(client, {**BASE, "mode": "img2img", "init_image": f"job:{job['id']}/0"})
        assert images_of(chained)[0].shape == (64, 80, 3)
        inline = "data:image/png;base64," + base64.b64encode(png_bytes(gradient(64, 64))).decode()
        assert images_of(run(client, {**BASE, "mode": "img2img", "init_image": inline}))[0].shape \
            == (64, 64, 3)


def test_inpaint_with_shapes_keeps_unmasked_pixels_exactly(stack: RunningStack) -> None:
    source = gradient(64, 64)
    with stack.client() as client:
        ref = upload(client, source)
        spec = {**BASE, "mode": "inpaint", "init_image": ref,
                "mask": {"shapes": [{"type": "rect", "x": 16, "y": 16, "width": 24, "height": 24},
                                    {"type": "circle", "cx": 52, "cy": 52, "r": 6}]}}
        job = run(client, spec)
        out = images_of(job)[0]
        assert job["result"]["pipeline"] == "StableDiffusionInpaintPipeline"
        keep = np.ones((64, 64), bool)
        keep[16:40, 16:40] = False
        yy, xx = np.mgrid[:64, :64]
        keep &= (yy - 52) ** 2 + (xx - 52) ** 2 > 7 ** 2
        assert np.array_equal(out[keep], np.asarray(source)[keep])
        assert not np.array_equal(out[20:36, 20:36], np.asarray(source)[20:36, 20:36])
        # The same mask given as an image gives the same pixels.
        mask = Image.new("L", (64, 64), 0)
        from PIL import ImageDraw

        draw = ImageDraw.Draw(mask)
        draw.rectangle((16, 16, 39, 39), fill=255)
        draw.ellipse((46, 46, 58, 58), fill=255)
        as_image = run(client, {**spec, "mask": {"image": upload(client, mask.convert("RGB"))}})
        assert images_of(as_image)[0].shape == (64, 64, 3)


def test_outpaint_extends_the_canvas(stack: RunningStack) -> None:
    source = gradient(64, 64)
    with stack.client() as client:
        ref = upload(client, source)
        job = run(client, {**BASE, "mode": "outpaint", "init_image": ref,
                           "outpaint": {"left": 16, "right": 32, "top": 8, "feather": 4}})
        out = images_of(job)[0]
        assert out.shape == (72, 112, 3)
        assert job["spec"]["width"] == 112 and job["spec"]["height"] == 72
        # A feather wider than the image is all seam, not an error.
        wide = run(client, {**BASE, "mode": "outpaint", "init_image": ref,
                            "outpaint": {"left": 64, "feather": 64}})
        assert images_of(wide)[0].shape == (64, 128, 3)
        # The original, past the repainted seam (8 px overlap + 2 x feather), is kept as sent.
        inner = out[8 + 20:8 + 44, 16 + 20:16 + 44]
        assert np.array_equal(inner, np.asarray(source)[20:44, 20:44])


def _bomb_png() -> bytes:
    """A valid PNG header claiming 20000x20000 pixels, a few hundred bytes on the wire."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(
        b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")


def test_bad_inputs_are_problems_and_create_no_job(stack: RunningStack) -> None:
    with stack.client("bob") as client:
        before = client.get("/v1/jobs", params={"limit": 100}).json()["items"]
        ref = upload(client, gradient(64, 64))
        cases: list[tuple[dict, str]] = [  # type: ignore[type-arg]
            ({**BASE, "mode": "img2img", "init_image": ref, "strength": 1.5}, "strength"),
            ({**BASE, "mode": "img2img", "init_image": "upload:doesnotexist"}, "init_image"),
            ({**BASE, "mode": "img2img"}, "init_image"),
            ({**BASE, "mode": "inpaint", "init_image": ref,
              "mask": {"image": upload(client, gradient(64, 32))}}, "mask.image"),
            ({**BASE, "mode": "inpaint", "init_image": ref,
              "mask": {"shapes": [{"type": "rect", "x": 0, "y": 0, "width": 4, "height": 4,
                                   "value": 0}]}}, "mask.shapes"),
            ({**BASE, "controls": [{"type": "lineart", "image": ref}]}, "controls.0.type"),
            ({**BASE, "controls": [{"type": "canny", "image": ref, "start": 0.8, "end": 0.2}]},
             "controls.0"),
            ({**BASE, "mode": "img2img", "init_image": "data:image/png;base64,"
              + base64.b64encode(b"not an image at all").decode()}, "init_image"),
            ({**BASE, "mode": "img2img", "init_image": "data:image/png;base64,"
              + base64.b64encode(_bomb_png()).decode()}, "init_image"),
            ({**BASE, "mode": "img2img", "init_image": "data:nocomma"}, "init_image"),
            ({**BASE, "mode": "img2img", "init_image": "upload:" + "a" * 300}, "init_image"),
            ({**BASE, "mode": "img2img",
              "init_image": "job:6d1f0c3e-8a4b-4d2e-9f0a-1b2c3d4e5f60/\u00b2"}, "init_image"),
            ({**BASE, "model": "tiny-flux", "width": 72}, "width"),
            ({**BASE, "controls": [{"type": "openpose",
                                    "keypoints": {"people": [{"pose_keypoints_2d": [1]}]}}]},
             "controls.0"),
        ]
        for spec, field in cases:
            response = client.post("/v1/generations", json=spec)
            assert 400 <= response.status_code < 500, (field, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            fields = [e["field"] for e in response.json().get("errors") or []]
            assert any(f.startswith(field) for f in fields), (field, response.json())
        not_image = client.post("/v1/uploads", files={"file": ("x.png", b"GIF89a nope", "image/png")})
        assert not_image.status_code == 422 and not_image.json()["errors"][0]["field"] == "file"
        bomb = client.post("/v1/uploads", files={"file": ("b.png", _bomb_png(), "image/png")})
        assert bomb.status_code == 413, bomb.text
        after = client.get("/v1/jobs", params={"limit": 100}).json()["items"]
        assert len(after) == len(before)

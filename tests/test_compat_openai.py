"""The real `openai` client against Loomis: only the base URL and the key change."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import RunningStack

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def client_for(stack: RunningStack, tenant: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.keys[tenant], max_retries=0)


def pixels(data: bytes) -> np.ndarray:  # type: ignore[type-arg]
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def picture(size: int = 64) -> Image.Image:
    x = np.linspace(0, 255, size, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, size, dtype=np.float32)[:, None]
    rgb = np.stack([np.broadcast_to(x, (size, size)), np.broadcast_to(y, (size, size)),
                    np.full((size, size), 90.0)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_generate_returns_b64_and_urls_and_each_request_is_a_job(stack: RunningStack) -> None:
    client = client_for(stack)
    result = client.images.generate(model="tiny-sd15", prompt="a red fox", n=2, size="64x64",
                                    response_format="b64_json", quality="low", user="u-1")
    assert len(result.data) == 2 and result.created > 0
    first = base64.b64decode(result.data[0].b64_json or "")
    assert Image.open(io.BytesIO(first)).size == (64, 64)
    assert result.data[0].revised_prompt == "a red fox" and result.size == "64x64"
    by_url = client.images.generate(model="tiny-sd15", prompt="a red fox", size="64x64",
                                     response_format="url", output_format="jpeg",
                                     output_compression=50)
    fetched = httpx.get(by_url.data[0].url or "")
    assert fetched.status_code == 200 and fetched.content[:2] == b"\xff\xd8"  # a JPEG
    with stack.client() as http:
        jobs = http.get("/v1/jobs", params={"limit": 5}).json()["items"]
        origins = [job["spec"].get("compat") for job in jobs[:2]]
        assert {"api": "openai.images.generate", "user": "u-1"} in origins
        low = next(job for job in jobs if job["spec"].get("compat", {}).get("user") == "u-1")
        assert low["spec"]["steps"] < 4 or low["spec"]["steps"] == 1  # quality=low: fewer steps
    with stack.client("bob") as bob:
        assert low["id"] not in {j["id"] for j in bob.get("/v1/jobs").json()["items"]}
        assert bob.get(f"/v1/jobs/{low['id']}").status_code == 404


def test_edit_keeps_opaque_pixels_and_changes_the_transparent_area(stack: RunningStack) -> None:
    client = client_for(stack)
    source = picture()
    mask = Image.new("RGBA", source.size, (0, 0, 0, 255))
    hole = np.zeros((64, 64), dtype=bool)
    hole[16:48, 16:48] = True
    alpha = np.where(hole, 0, 255).astype(np.uint8)
    mask.putalpha(Image.fromarray(alpha, "L"))
    result = client.images.edit(model="tiny-sd15", image=("in.png", png(source), "image/png"),
                                mask=("mask.png", png(mask), "image/png"),
                                prompt="a window", size="64x64")
    out = pixels(base64.b64decode(result.data[0].b64_json or ""))
    original = np.asarray(source).astype(int)
    assert np.array_equal(out[~hole], original[~hole])
    assert (np.abs(out[hole] - original[hole]).sum(axis=1) > 0).any()


def test_variations_and_errors(stack: RunningStack) -> None:
    client = client_for(stack)
    result = client.images.create_variation(image=("in.png", png(picture()), "image/png"),
                                            n=1, model="tiny-sd15", size="64x64")
    assert len(result.data) == 1
    with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as raised:
        client.images.generate(model="no-such-model", prompt="x")
    assert raised.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad_size:
        client.images.generate(model="tiny-sd15", prompt="x", size="99999x3")
    assert bad_size.value.body["param"] == "size"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as transparent:
        client.images.generate(model="tiny-sd15", prompt="x", background="transparent")
    assert transparent.value.body["param"] == "background"  # type: ignore[index]
    # found by hostile testing: a mask without alpha was refused as "no transparent pixels";
    # a second mask, a repeated field and a stray file were accepted and never read
    with pytest.raises(openai.BadRequestError) as opaque:
        client.images.edit(model="tiny-sd15", prompt="x", image=("a.png", png(picture()),
                                                                   "image/png"),
                           mask=("m.png", png(Image.new("RGB", (64, 64))), "image/png"))
    assert opaque.value.body["param"] == "mask" and "alpha" in str(opaque.value)  # type: ignore[index]
    image = ("a.png", png(picture()), "image/png")
    hole = ("m.png", png(Image.new("RGBA", (64, 64))), "image/png")
    with stack.client() as http:
        for data, files, param in (
                ({"prompt": "x"}, [("image", image), ("mask", hole), ("mask", hole)], "mask"),
                ({"prompt": "x", "n": ["1", "3"]}, [("image", image)], "n"),
                ({"prompt": "x"}, [("image", image), ("prompt", ("p.txt", b"y", "text/plain"))],
                 "prompt"),
                ({"prompt": "x"}, [("image", image), ("reference", image)], "reference")):
            answer = http.post("/v1/images/edits", data={"model": "tiny-sd15", **data},
                               files=files)
            assert answer.status_code == 400, (param, answer.text)
            assert answer.json()["error"]["param"] == param, answer.text
    wrong = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="lmk_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(model="tiny-sd15", prompt="x")

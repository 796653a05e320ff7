"""The real `webuiapi` client against Loomis' AUTOMATIC1111 API: only the host, port and
credentials change."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import webuiapi
from PIL import Image, ImageFilter

from tests.conftest import RunningStack, wait_terminal
from tests.lora_files import make_lora
from tests.test_compat_openai import picture

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def webui(stack: RunningStack, tenant: str = "alice") -> webuiapi.WebUIApi:
    url = urlparse(stack.url)
    api = webuiapi.WebUIApi(host=url.hostname, port=url.port, sampler="Euler a", steps=2)
    api.set_auth("loomis", stack.keys[tenant])
    return api


def arr(image: Image.Image) -> np.ndarray:  # type: ignore[type-arg]
    return np.asarray(image.convert("RGB")).astype(int)


def test_txt2img_batch_equals_the_native_generation(stack: RunningStack) -> None:
    api = webui(stack)
    result = api.txt2img(prompt="a red fox", negative_prompt="blurry", seed=1234, steps=3,
                         cfg_scale=6.5, width=64, height=64, batch_size=2, sampler_name="DDIM")
    assert len(result.images) == 2
    assert result.info["seed"] == 1234 and result.info["all_seeds"] == [1234, 1235]
    assert result.info["sampler_name"] == "DDIM" and result.info["steps"] == 3
    assert "Steps: 3" in result.images[0].info["parameters"]
    assert "Eta DDIM: 1.0" in result.images[0].info["parameters"]
    assert result.info["extra_generation_params"]["Eta DDIM"] == 1.0
    assert len(result.info["infotexts"]) == 2
    with stack.client() as client:
        native = client.post("/v1/generations", json={
            "prompt": "a red fox", "negative_prompt": "blurry", "seed": 1234, "steps": 3,
            "guidance_scale": 6.5, "width": 64, "height": 64, "num_images": 2,
            "scheduler": "DDIM", "eta": 1.0, "model": "tiny-sd15"})  # webuiapi sends eta 1
        job = wait_terminal(client, native.json()["id"], timeout=120)
        images = sorted((a for a in job["artifacts"] if a["kind"] == "image"),
                        key=lambda a: a["index"])
        import httpx

        for ours, theirs in zip(result.images, images, strict=True):
            native_image = Image.open(io.BytesIO(httpx.get(theirs["url"]).content))
            assert np.array_equal(arr(ours), arr(native_image))
        # the compat request is a job of the key's tenant, with its origin
        compat_job = client.get(f"/v1/jobs/{result.info['loomis_job_ids'][0]}").json()
        assert compat_job["spec"]["compat"]["api"] == "a1111.txt2img"
    with stack.client("bob") as bob:
        assert bob.get(f"/v1/jobs/{result.info['loomis_job_ids'][0]}").status_code == 404


def test_img2img_and_inpainting_keep_unmasked_pixels(stack: RunningStack) -> None:
    api = webui(stack)
    source = picture()
    changed = api.img2img(images=[source], prompt="autumn", seed=5, steps=3, width=64,
                          height=64, denoising_strength=0.6)
    assert changed.image.size == (64, 64)
    assert not np.array_equal(arr(changed.image), arr(source))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 20, 44, 44))
    for full_res in (True, False):
        painted = api.img2img(images=[source], mask_image=mask, prompt="a window", seed=5,
                              steps=3, width=64, height=64, denoising_strength=1.0,
                              inpaint_full_res=full_res, mask_blur=4, inpainting_fill=1)
        out, original = arr(painted.image), arr(source)
        near = np.asarray(mask.filter(ImageFilter.MaxFilter(25))) > 0  # mask + 3 sigma of blur
        assert np.array_equal(out[~near], original[~near]), full_res
        inside = np.asarray(mask) > 0
        assert (np.abs(out[inside] - original[inside]).sum(axis=1) > 0).any()


def test_controlnet_unit_by_module_and_model(stack: RunningStack) -> None:
    api = webui(stack)
    assert "canny" in api.controlnet_model_list()
    assert "canny" in api.controlnet_module_list()
    base = {"prompt": "a house", "seed": 8, "steps": 3, "width": 64, "height": 64}
    plain = api.txt2img(**base)
    unit = webuiapi.ControlNetUnit(image=picture(), module="canny", model="canny", weight=1.0,
                                   threshold_a=50, threshold_b=150)
    controlled = api.txt2img(**base, controlnet_units=[unit])
    assert not np.array_equal(arr(plain.image), arr(controlled.image))
    detected = api.controlnet_detect(images=[picture()], module="canny")
    assert detected.image.size[0] > 0
    again = api.txt2img(**base)  # a later call without units has none (webuiapi's defaults)
    assert np.array_equal(arr(plain.image), arr(again.image))


def test_lora_in_the_prompt_and_weight_zero(stack: RunningStack, model_cache: Path) -> None:
    with stack.client() as client:
        upload = client.post("/v1/loras", data={"base_model": "tiny-sd15", "name": "webui-style"},
                             files={"file": ("s.safetensors",
                                             make_lora("sd15", cache_dir=model_cache, seed=12),
                                             "application/octet-stream")})
        assert upload.status_code == 201, upload.text
    api = webui(stack)
    assert "webui-style" in {lora["name"] for lora in api.get_loras()}
    base = {"seed": 21, "steps": 3, "width": 64, "height": 64}
    none = api.txt2img(prompt="a cat", **base)
    weighted = api.txt2img(prompt="a cat <lora:webui-style:0.8>", **base)
    zero = api.txt2img(prompt="a cat <lora:webui-style:0>", **base)
    assert not np.array_equal(arr(none.image), arr(weighted.image))
    assert np.array_equal(arr(none.image), arr(zero.image))
    assert weighted.info["prompt"] == "a cat"
    with pytest.raises(RuntimeError, match="no LoRA named"):
        api.txt2img(prompt="a cat <lora:missing:1>", **base)


def test_models_samplers_options_progress_interrupt_and_png_info(stack: RunningStack) -> None:
    api = webui(stack)
    titles = api.util_get_model_names()
    assert "tiny-sd15" in titles
    assert "Euler a" in api.util_get_sampler_names()
    assert {s["name"] for s in api.get_schedulers()} >= {"automatic", "karras"}
    api.util_set_model("tiny-sd15")
    assert api.get_options()["sd_model_checkpoint"] == "tiny-sd15"
    assert api.util_get_current_model() == "tiny-sd15"
    assert api.get_progress()["state"]["job_count"] == 0
    # a long request in a thread; its progress shows, interrupt cancels it
    failure: list[BaseException] = []

    results: list[webuiapi.WebUIApiResult] = []

    def long_run() -> None:
        try:
            results.append(webui(stack).txt2img(prompt="slow", steps=150, width=256,
                                                height=256, seed=1))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)

    worker = threading.Thread(target=long_run)
    worker.start()
    deadline = time.monotonic() + 60
    seen = {}
    while time.monotonic() < deadline:
        seen = api.get_progress()
        if seen["state"]["job_count"] and seen["state"]["sampling_step"] > 0:
            break
        time.sleep(0.1)
    assert seen["progress"] > 0 and seen["state"]["sampling_steps"] == 150, seen
    api.interrupt()
    worker.join(60)
    # as webui answers an interrupted request: 200, with what was made (nothing here)
    assert not failure and results[0].images == [] and results[0].info["interrupted"]
    assert api.get_progress()["state"]["job_count"] == 0
    # png-info of a Loomis PNG
    made = api.txt2img(prompt="a boat", seed=3, steps=2, width=64, height=64)
    buffer = io.BytesIO()
    made.image.save(buffer, format="PNG", pnginfo=_text(made.image))
    info = api.png_info(Image.open(io.BytesIO(buffer.getvalue())))
    assert info.parameters["Prompt"] == "a boat" and info.parameters["Seed"] == "3"
    assert info.parameters["Size-1"] == "64"
    assert api.get_scripts()["txt2img"] and "ram" in api.get_memory()
    assert isinstance(api.get_cmd_flags(), dict)
    assert api.controlnet_version() == 2


def _text(image: Image.Image):  # type: ignore[no-untyped-def]
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        if isinstance(value, str):
            info.add_text(key, value)
    return info


def test_unsupported_fields_are_refused_and_credentials_checked(stack: RunningStack) -> None:
    api = webui(stack)
    for field, kwargs in (("enable_hr", {"enable_hr": True}),
                          ("restore_faces", {"restore_faces": True}),
                          ("tiling", {"tiling": True}),
                          ("script_name", {"script_name": "x/y/z plot"})):
        with pytest.raises(RuntimeError, match=field):
            api.txt2img(prompt="x", steps=2, width=64, height=64, **kwargs)
    with pytest.raises(RuntimeError, match="sampler"):
        api.txt2img(prompt="x", steps=2, width=64, height=64, sampler_name="Magic")
    url = urlparse(stack.url)
    stranger = webuiapi.WebUIApi(host=url.hostname, port=url.port)
    stranger.set_auth("loomis", "lmk_wrong")
    with pytest.raises(RuntimeError, match="401"):
        stranger.txt2img(prompt="x", steps=2, width=64, height=64)
    _ = base64


def test_every_honoured_option_changes_the_result(stack: RunningStack) -> None:
    """Accepted options must do something: each pair differs only in one option."""
    api = webui(stack)
    source = picture()
    wide = source.resize((96, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 40))
    base = {"images": [source], "mask_image": mask, "prompt": "a door", "seed": 9, "steps": 3,
            "width": 64, "height": 64, "denoising_strength": 0.6, "inpaint_full_res": False}

    def img(**change: object) -> np.ndarray:  # type: ignore[type-arg]
        return arr(api.img2img(**{**base, **change}).image)

    assert not np.array_equal(img(inpainting_mask_invert=0), img(inpainting_mask_invert=1))
    fills = [img(inpainting_fill=fill) for fill in (0, 1, 2, 3)]
    assert all(not np.array_equal(fills[i], fills[j]) for i in range(4) for j in range(i + 1, 4))
    assert not np.array_equal(img(mask_blur=0), img(mask_blur=8))
    assert not np.array_equal(img(inpaint_full_res=True, inpaint_full_res_padding=0),
                              img(inpaint_full_res=True, inpaint_full_res_padding=16))
    plain = {"images": [wide], "prompt": "a door", "seed": 9, "steps": 3, "width": 64,
             "height": 64, "denoising_strength": 0.5}
    assert not np.array_equal(arr(api.img2img(**plain, resize_mode=0).image),
                              arr(api.img2img(**plain, resize_mode=1).image))
    txt = {"prompt": "a hill", "seed": 2, "steps": 3, "width": 64, "height": 64}
    two = api.txt2img(**txt, n_iter=2)
    assert len(two.images) == 2 and two.info["all_seeds"] == [2, 3]
    assert not np.array_equal(arr(api.txt2img(**txt, sampler_name="DPM++ 2M").image),
                              arr(api.txt2img(**txt, sampler_name="DPM++ 2M",
                                              scheduler="karras").image))
    # eta is DDIM's η (webuiapi sends 1 unless told); Euler never reads it, in webui as here
    assert not np.array_equal(arr(api.txt2img(**txt, sampler_name="DDIM", eta=0).image),
                              arr(api.txt2img(**txt, sampler_name="DDIM", eta=1).image))
    assert np.array_equal(arr(api.txt2img(**txt, sampler_name="Euler", eta=0).image),
                          arr(api.txt2img(**txt, sampler_name="Euler", eta=1).image))
    with pytest.raises(RuntimeError, match="eta"):
        api.txt2img(**txt, sampler_name="Euler a", eta=0.5)
    other = api.txt2img(**txt, override_settings={"sd_model_checkpoint": "tiny-sdxl"})
    assert other.info["sd_model_name"] == "tiny-sdxl"

    shapes = Image.new("RGB", (64, 64), (100, 100, 100))
    shapes.paste((130, 130, 130), (8, 8, 30, 30))  # a faint edge: only low thresholds see it
    shapes.paste((250, 250, 250), (36, 36, 58, 58))  # a strong one

    def unit(**change: object) -> np.ndarray:  # type: ignore[type-arg]
        fields: dict[str, object] = {"image": shapes, "module": "canny", "model": "canny",
                                     "threshold_a": 100, "threshold_b": 200, **change}
        return arr(api.txt2img(**txt, controlnet_units=[webuiapi.ControlNetUnit(
            **fields)]).image)  # type: ignore[arg-type]

    reference = unit()
    for change in ({"weight": 0.3}, {"guidance_end": 0.3}, {"guidance_start": 0.5},
                   {"threshold_a": 20, "threshold_b": 60}, {"module": "none"},
                   {"resize_mode": "Crop and Resize", "image": shapes.resize((96, 64))},
                   {"processor_res": 32}, {"pixel_perfect": True}):
        assert not np.array_equal(reference, unit(**change)), change


def test_skip_cancels_the_running_request(stack: RunningStack) -> None:
    api = webui(stack)
    failure: list[BaseException] = []
    results: list[webuiapi.WebUIApiResult] = []

    def long_run() -> None:
        try:
            results.append(webui(stack).txt2img(prompt="slow", steps=150, width=256,
                                                height=256, seed=2))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)

    worker = threading.Thread(target=long_run)
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not api.get_progress()["state"]["sampling_step"]:
        time.sleep(0.1)
    assert api.skip() is None
    worker.join(60)
    assert not failure and results[0].images == [] and results[0].info["interrupted"]


def test_hostile_requests_are_400s_naming_the_field(stack: RunningStack,
                                                    model_cache: Path) -> None:
    """Found by hostile testing: each was a 500, a wrong refusal or a silent no-op."""
    import httpx

    from tests.test_compat_openai import png

    key = stack.keys["alice"]
    auth = ("webui", key)
    shapes = base64.b64encode(png(picture())).decode()
    base = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 3}

    def post(path: str, **body: object) -> httpx.Response:
        return httpx.post(f"{stack.url}/sdapi/v1/{path}", json={**base, **body}, auth=auth,
                          timeout=120)

    unit = {"image": shapes, "module": "canny", "model": "canny"}
    cases = [
        ({"prompt": "a <lora:x:4.5>"}, "prompt"),
        ({"override_settings": {"sd_model_checkpoint": 5}},
         "override_settings.sd_model_checkpoint"),
        ({"alwayson_scripts": {"controlnet": "x"}}, "alwayson_scripts.controlnet"),
        ({"alwayson_scripts": {"controlnet": {"args": [{**unit, "processor_res": "abc"}]}}},
         "alwayson_scripts.ControlNet.args.0.processor_res"),
        ({"alwayson_scripts": {"controlnet": {"args": [{**unit, "weight": None, "threshold_a": "x"}]}}},
         "alwayson_scripts.ControlNet.args.0.threshold_a"),
        ({"alwayson_scripts": {"controlnet": {"args": [{**unit, "resize_mode": [1]}]}}},
         "alwayson_scripts.ControlNet.args.0.resize_mode"),
        ({"alwayson_scripts": {"controlnet": {"args": [{**unit, "weight": 5}]}}},
         "alwayson_scripts.ControlNet.args.0.weight"),
        ({"alwayson_scripts": {"ControlNet": {"args": [unit]}, "controlnet": {"args": []}}},
         "alwayson_scripts.controlnet"),
        ({"scheduler": "Exponential"}, "scheduler"),
        ({"refiner_checkpoint": "xl-refiner"}, "refiner_checkpoint"),
        ({"alwayson_scripts": {"ADetailer": "on"}}, "alwayson_scripts.ADetailer"),
    ]
    for change, field in cases:
        answer = post("txt2img", **change)
        assert answer.status_code == 400, (change, answer.text)
        assert field in {e["field"] for e in answer.json()["fields"]}, (change, answer.text)
    detect = httpx.post(f"{stack.url}/controlnet/detect", auth=auth, json={
        "controlnet_module": "canny", "controlnet_input_images": [shapes],
        "controlnet_threshold_a": 999})
    assert detect.status_code == 400 and "controlnet_threshold_a" in detect.text
    # sizes are checked before an image is fitted to them: 0 or less was a 500 (Pillow), a
    # huge one was allocated in the gateway before the spec refused it
    for change, field in (({"width": 0}, "width"), ({"height": -64}, "height"),
                          ({"width": 100_000}, "width")):
        for path, images in (("img2img", {"init_images": [shapes]}),
                             ("txt2img", {"alwayson_scripts": {"controlnet": {"args": [unit]}}})):
            answer = post(path, **images, **change)
            assert answer.status_code == 400, (path, change, answer.text)
            assert field in {e["field"] for e in answer.json()["fields"]}, answer.text
    # processor_res sets the short side: a thin image's long side grows as much, refused
    # before the map is made (an 8x2048 image at 4096 would be gigabytes)
    thin = base64.b64encode(png(Image.new("RGB", (8, 2048)))).decode()
    detect = httpx.post(f"{stack.url}/controlnet/detect", auth=auth, json={
        "controlnet_module": "canny", "controlnet_input_images": [thin],
        "controlnet_processor_res": 512})
    assert detect.status_code == 400, detect.text
    assert detect.json()["fields"][0]["field"] == "controlnet_processor_res"
    tall = post("txt2img", width=64, height=1024, alwayson_scripts={"controlnet": {"args": [
        {**unit, "processor_res": 2048}]}})
    assert tall.status_code == 400, tall.text
    assert tall.json()["fields"][0]["field"] == "alwayson_scripts.ControlNet.args.0.processor_res"
    odd = httpx.get(f"{stack.url}/sdapi/v1/sd-models",
                    headers={"Authorization": b"Basic \xe9\xe9=="})
    assert odd.status_code == 401
    # a unit without resize_mode is webui's default (Just Resize); "enabled": "false" is off
    assert post("txt2img", alwayson_scripts={"controlnet": {"args": [unit]}}).status_code == 200
    off = post("txt2img", alwayson_scripts={"controlnet": {"args": [{**unit, "enabled": "false"}]}})
    plain = post("txt2img")
    def pixels_of(answer: httpx.Response) -> np.ndarray:  # type: ignore[type-arg]
        return arr(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))))

    assert np.array_equal(pixels_of(off), pixels_of(plain))
    # disable_extra_networks: the <lora:…> tags are dropped, not applied
    with stack.client() as client:
        client.post("/v1/loras", data={"base_model": "tiny-sd15", "name": "xn"},
                    files={"file": ("x.safetensors", make_lora("sd15", cache_dir=model_cache,
                                                                seed=33),
                                    "application/octet-stream")})
    dropped = post("txt2img", prompt="a cat <lora:xn:1>", disable_extra_networks=True)
    assert np.array_equal(pixels_of(dropped), pixels_of(plain))
    assert "x_pad" not in post("txt2img", x_pad="y" * 1000).json()["parameters"]
    # only-masked inpainting answers at width x height, as webui does
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (10, 10, 30, 30))
    masked = post("img2img", init_images=[shapes], mask=base64.b64encode(png(mask)).decode(),
                  width=128, height=64, inpaint_full_res=True, denoising_strength=0.8)
    assert masked.status_code == 200, masked.text
    out = Image.open(io.BytesIO(base64.b64decode(masked.json()["images"][0])))
    assert out.size == (128, 64)


def test_base64_in_mime_lines_is_read_as_webui_reads_it(stack: RunningStack) -> None:
    """``base64.encodebytes`` (76-character lines) is what some clients send; webui's decoder
    skips the line breaks, so the image is the same as from one unbroken line."""
    import httpx

    from tests.test_compat_openai import png

    raw = png(picture())
    auth = ("loomis", stack.keys["alice"])
    body = {"prompt": "a door", "seed": 3, "steps": 2, "width": 64, "height": 64,
            "denoising_strength": 0.5}
    lines = base64.encodebytes(raw).decode()
    assert "\n" in lines
    answers = [httpx.post(f"{stack.url}/sdapi/v1/img2img", auth=auth, timeout=120,
                          json={**body, "init_images": [encoded]})
               for encoded in (lines, base64.b64encode(raw).decode())]
    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    first, second = (arr(Image.open(io.BytesIO(base64.b64decode(a.json()["images"][0]))))
                     for a in answers)
    assert np.array_equal(first, second)
    info = httpx.post(f"{stack.url}/sdapi/v1/png-info", auth=auth, json={
        "image": base64.encodebytes(base64.b64decode(answers[0].json()["images"][0])).decode()})
    assert info.status_code == 200 and "Steps: 2" in info.json()["info"]
    # other control characters are still refused, naming the field
    bad = httpx.post(f"{stack.url}/sdapi/v1/img2img", auth=auth, timeout=60,
                     json={**body, "init_images": [lines.replace("\n", "\x00", 1)]})
    assert bad.status_code == 422 and "init_images" in bad.text  # as webui validates

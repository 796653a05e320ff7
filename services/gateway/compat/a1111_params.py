"""AUTOMATIC1111 vocabulary in Loomis terms: samplers and schedulers, `<lora:name:weight>`
prompts, masks and image fitting, ControlNet units, and webui's infotext.

Pure functions (Pillow, OpenCV for the "fill" of masked content); the routes in ``a1111.py``
do the I/O.
"""

from __future__ import annotations

import base64
import io
import random
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFilter, ImageOps

from services.gateway.images import decode_data_url, decode_image
from shared.errors import ValidationFailed
from shared.models import SCHEDULERS, ControlType

# webui sampler names -> Loomis scheduler names (webui's "PLMS" is diffusers' PNDM)
SAMPLERS = {"Euler a": "Euler a", "Euler": "Euler", "DPM++ 2M": "DPM++ 2M", "DDIM": "DDIM",
            "UniPC": "UniPC", "Heun": "Heun", "LMS": "LMS", "PLMS": "PNDM", "DPM2": "DPM2",
            "DPM2 a": "DPM2 a", "DPM++ 2S": "DPM++ 2S"}
SAMPLER_ALIASES = {"Euler a": ["k_euler_a", "k_euler_ancestral"], "Euler": ["k_euler"],
                   "DPM++ 2M": ["k_dpmpp_2m"], "DDIM": [], "UniPC": [], "Heun": ["k_heun"],
                   "LMS": ["k_lms"], "PLMS": [], "DPM2": ["k_dpm_2"], "DPM2 a": ["k_dpm_2_a"],
                   "DPM++ 2S": []}
# webui schedule types Loomis has: "automatic" is the sampler's own; Karras for DPM++ 2M
SCHEDULE_TYPES = {"automatic": "Automatic", "karras": "Karras"}
MODULES = {"none": None, "canny": ControlType.CANNY, "depth": ControlType.DEPTH,
           "depth_midas": ControlType.DEPTH, "depth_leres": ControlType.DEPTH,
           "depth_zoe": ControlType.DEPTH, "openpose": ControlType.OPENPOSE,
           "openpose_full": ControlType.OPENPOSE, "scribble": ControlType.SCRIBBLE,
           "scribble_hed": ControlType.SCRIBBLE, "scribble_pidinet": ControlType.SCRIBBLE,
           "scribble_xdog": ControlType.SCRIBBLE}
RESIZE_MODES = {0: "Just Resize", 1: "Crop and Resize", 2: "Resize and Fill", 3: "Just Resize",
                "just resize": "Just Resize", "crop and resize": "Crop and Resize",
                "resize and fill": "Resize and Fill", "inner fit (scale to fit)": "Crop and Resize",
                "scale to fit (inner fit)": "Crop and Resize",
                "outer fit (shrink to fit)": "Resize and Fill",
                "envelope (outer fit)": "Resize and Fill"}
_LORA = re.compile(r"<(lora|lyco|hypernet):([^:>]+)(?::([^:>]*))?(:[^>]*)?>", re.IGNORECASE)


def invalid(field: str, message: str) -> ValidationFailed:
    error = ValidationFailed([{"field": field, "message": message}])
    error.status = 400
    return error


def loomis_scheduler(sampler: str | None, schedule: str | None, *, field: str) -> str | None:
    """(webui sampler, schedule type) -> a Loomis scheduler; None: the model's own."""
    if not sampler:
        return None
    name, kind = sampler.strip(), (schedule or "automatic").strip().lower()
    if name.lower().endswith(" karras"):  # webui's legacy combined names
        name, kind = name[: -len(" karras")], "karras"
    base = next((loomis for webui, loomis in SAMPLERS.items()
                 if webui.lower() == name.lower()
                 or name.lower() in SAMPLER_ALIASES.get(webui, [])), None)
    if base is None:
        raise invalid(field, f"sampler {sampler!r} is not available; choose one of "
                      f"{', '.join(SAMPLERS)}")
    if kind == "automatic":
        return base
    wanted = f"{base} {SCHEDULE_TYPES.get(kind, kind).title()}"
    if kind not in SCHEDULE_TYPES or wanted not in SCHEDULERS:
        raise invalid("scheduler", f"schedule type {schedule!r} with {sampler!r} is not "
                      "available; use automatic (or karras with DPM++ 2M)")
    return wanted


def webui_sampler(scheduler: str) -> tuple[str, str]:
    """A Loomis scheduler as webui's (sampler, schedule type)."""
    if scheduler.endswith(" Karras"):
        return scheduler.removesuffix(" Karras"), "Karras"
    webui = next((w for w, loomis in SAMPLERS.items() if loomis == scheduler), scheduler)
    return webui, "Automatic"


def lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its ``<lora:name:weight>`` tags, and the tags (weight default 1)."""
    found: list[tuple[str, float]] = []
    for kind, name, weight, extra in _LORA.findall(prompt):
        if kind.lower() != "lora":
            raise invalid("prompt", f"<{kind}:…> is not supported; LoRAs are `<lora:name:weight>`")
        if extra:
            raise invalid("prompt", f"<lora:{name}:{weight}{extra}>: only a name and one "
                          "weight are supported (no text-encoder weight or block weights)")
        try:
            value = float(weight) if weight not in ("", None) else 1.0
        except ValueError as exc:
            raise invalid("prompt", f"<lora:{name}:{weight}>: the weight is not a number") from exc
        found.append((name.strip(), value))
    text = _LORA.sub("", prompt)
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)
    return " ".join(text.split()).strip(" ,"), found


def image_of(value: Any, *, field: str, mode: str = "RGB") -> Image.Image:
    """A webui image field: raw base64 or a data URL."""
    if not isinstance(value, str) or not value:
        raise invalid(field, "expected a base64 image")
    if "\n" in value or "\r" in value:
        value = "".join(value.split())  # MIME base64 lines, which webui's decoder skips
    return decode_image(decode_data_url(value, field=field), field=field, mode=mode).image


def fit(image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """webui's resize modes: Just Resize stretches, Crop and Resize fills and crops, Resize and
    Fill fits and pads (with the edge colours stretched, as webui fills)."""
    if image.size == size:
        return image
    if mode == "Crop and Resize":
        return ImageOps.fit(image, size, Image.Resampling.LANCZOS)
    if mode == "Resize and Fill":
        inner = ImageOps.contain(image, size, Image.Resampling.LANCZOS)
        canvas = image.resize(size, Image.Resampling.BILINEAR).filter(
            ImageFilter.GaussianBlur(16))
        canvas.paste(inner, ((size[0] - inner.width) // 2, (size[1] - inner.height) // 2))
        return canvas
    return image.resize(size, Image.Resampling.LANCZOS)


def webui_mask(image: Image.Image, *, invert: bool) -> Image.Image:
    """webui's mask rule: white repaints (an RGBA mask with varying alpha: opaque repaints),
    thresholded at half; ``invert`` swaps the two."""
    if "A" in image.getbands() and image.getchannel("A").getextrema() != (255, 255):
        grey = image.getchannel("A")
    else:
        grey = image.convert("L")
    mask = grey.point(lambda value: 255 if value > 128 else 0)
    return ImageOps.invert(mask) if invert else mask


def prefill(image: Image.Image, mask: Image.Image, fill: int, *, seed: int) -> Image.Image:
    """webui's "masked content" before denoising: 1 original (as it is), 0 fill (the hole
    painted from its surroundings by webui's own blur-and-composite), 2 latent noise (random
    pixels), 3 latent nothing (flat grey). Done on the pixels, with Pillow alone."""
    if fill == 1:
        return image
    rgb = image.convert("RGB")
    if fill == 0:  # webui's modules/masking.py fill(), step for step
        result = Image.new("RGBA", rgb.size)
        kept = Image.new("RGBa", rgb.size)
        kept.paste(rgb.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
        for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
            blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
            for _ in range(repeats):
                result.alpha_composite(blurred)
        return result.convert("RGB")
    if fill == 2:
        noise = Image.frombytes("RGB", rgb.size,
                                random.Random(seed).randbytes(rgb.width * rgb.height * 3))
        return Image.composite(noise, rgb, mask.convert("L"))
    if fill == 3:
        return Image.composite(Image.new("RGB", rgb.size, (127, 127, 127)), rgb,
                               mask.convert("L"))
    raise invalid("inpainting_fill", "0 fill, 1 original, 2 latent noise or 3 latent nothing")


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + b64_png(image)


@dataclass(frozen=True)
class Crop:
    """``inpaint_full_res`` ("only masked"): the region repainted at full size, and where it
    goes back."""

    box: tuple[int, int, int, int]


def masked_region(mask: Image.Image, padding: int, size: tuple[int, int]) -> Crop:
    """The mask's bounding box plus ``padding``, grown to the generation's aspect ratio (as
    webui does), inside the image."""
    bbox = mask.getbbox()
    assert bbox is not None
    x0, y0, x1, y1 = bbox
    x0, y0 = max(0, x0 - padding), max(0, y0 - padding)
    x1, y1 = min(mask.width, x1 + padding), min(mask.height, y1 + padding)
    ratio = size[0] / size[1]
    w, h = x1 - x0, y1 - y0
    if w / h < ratio:
        grow = round(h * ratio) - w
        x0, x1 = x0 - grow // 2, x1 + grow - grow // 2
    else:
        grow = round(w / ratio) - h
        y0, y1 = y0 - grow // 2, y1 + grow - grow // 2
    dx = -x0 if x0 < 0 else (mask.width - x1 if x1 > mask.width else 0)
    dy = -y0 if y0 < 0 else (mask.height - y1 if y1 > mask.height else 0)
    x0, x1, y0, y1 = x0 + dx, x1 + dx, y0 + dy, y1 + dy
    return Crop((max(0, x0), max(0, y0), min(mask.width, x1), min(mask.height, y1)))


def infotext(text: str) -> dict[str, Any]:
    """webui's ``parse_generation_parameters``: prompt, negative prompt and each
    ``Key: value`` of the last line, values as strings (``Size`` split in two)."""
    lines = text.strip().split("\n")
    params: dict[str, Any] = {}
    pattern = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    last = lines[-1] if lines else ""
    found = pattern.findall(last)
    if len(found) >= 3:
        lines = lines[:-1]
    else:
        found = []
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    params["Prompt"] = "\n".join(prompt)
    params["Negative prompt"] = "\n".join(negative)
    for key, value in found:
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = value[1:-1]
        if key == "Size" and "x" in value:
            params["Size-1"], params["Size-2"] = value.split("x", 1)
        else:
            params[key] = value
    params.setdefault("Clip skip", "1")
    return params

"""The input files the README's curl examples name, made for the tiny model ``loomis up`` serves.

The examples upload ``photo.png``, ``style.safetensors`` and ``dogs.zip``; a new user has none
of them, and a real LoRA or photo would not fit ``tiny-sd15`` anyway. ``loomis examples``
writes small deterministic ones: a 64x64 picture with edges for canny, a kohya-format LoRA
whose layer widths are tiny-sd15's own, and a kohya training folder of four captioned images.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SEED = 7
LORA_RANK = 4
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DATASET_FOLDER = "10_sks dog"


def photo_png(size: int = 64) -> bytes:
    """A sky, a lawn, a door and a sun: flat areas with sharp edges, so canny finds lines."""
    image = Image.new("RGB", (size, size), (112, 160, 224))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, size * 3 // 4, size, size), fill=(70, 140, 60))
    draw.rectangle((size // 4, size // 8, size * 3 // 4, size * 7 // 8), fill=(120, 72, 40),
                   outline=(40, 24, 12), width=2)
    draw.ellipse((size * 5 // 8, size // 16, size * 15 // 16, size * 3 // 8), fill=(250, 220, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _lora_modules() -> dict[str, tuple[int, int]]:
    """tiny-sd15's attention projections in kohya naming, with (in, out) widths."""
    from services.models.tiny.diffusion import tiny_sd15_unet

    unet = tiny_sd15_unet()
    modules: dict[str, tuple[int, int]] = {}
    for name, module in unet.named_modules():
        if name.endswith(LORA_TARGETS) and hasattr(module, "in_features"):
            modules["lora_unet_" + name.replace(".", "_")] = (module.in_features,
                                                              module.out_features)
    return modules


def style_lora() -> bytes:
    """A kohya-format LoRA for tiny-sd15 (what sd-scripts writes), random but seeded.

    The weights are drawn large enough that the adapter visibly changes tiny-sd15's noise,
    so an example that applies it shows an effect.
    """
    from safetensors.numpy import save

    rng = np.random.default_rng(SEED)
    tensors: dict[str, np.ndarray] = {}
    for name, (fan_in, fan_out) in sorted(_lora_modules().items()):
        down = rng.standard_normal((LORA_RANK, fan_in)) / np.sqrt(fan_in)
        up = 0.5 * rng.standard_normal((fan_out, LORA_RANK)) / np.sqrt(LORA_RANK)
        tensors[f"{name}.lora_down.weight"] = down.astype(np.float32)
        tensors[f"{name}.lora_up.weight"] = up.astype(np.float32)
        tensors[f"{name}.alpha"] = np.array(float(LORA_RANK), dtype=np.float32)
    return save(tensors, metadata={"ss_network_module": "networks.lora",
                                   "ss_network_dim": str(LORA_RANK),
                                   "ss_network_alpha": str(LORA_RANK),
                                   "ss_output_name": "style"})


def dogs_zip(count: int = 4, size: int = 64) -> bytes:
    """A kohya training folder (``10_sks dog/``: 10 repeats, token ``sks``, class ``dog``)
    of distinct images, each with a ``.txt`` caption beside it."""
    rng = np.random.default_rng(SEED)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for index in range(count):
            base = rng.integers(0, 256, size=3)
            pixels = np.clip(base + rng.normal(0, 24, size=(size, size, 3)), 0, 255)
            image = Image.fromarray(pixels.astype(np.uint8), "RGB")
            png = io.BytesIO()
            image.save(png, format="PNG")
            stem = f"{DATASET_FOLDER}/dog-{index}"
            archive.writestr(f"{stem}.png", png.getvalue())
            archive.writestr(f"{stem}.txt", f"a photo of sks dog, picture {index}")
    return buffer.getvalue()


EXAMPLE_FILES = {
    "photo.png": photo_png,
    "style.safetensors": style_lora,
    "dogs.zip": dogs_zip,
}


def write_examples(folder: Path, *, overwrite: bool = False) -> list[tuple[Path, bool]]:
    """Write every example file into ``folder``; returns (path, written) — an existing file
    is kept unless ``overwrite``, since it may be the user's own photo.png."""
    folder.mkdir(parents=True, exist_ok=True)
    results: list[tuple[Path, bool]] = []
    for name, make in EXAMPLE_FILES.items():
        path = folder / name
        if path.exists() and not overwrite:
            results.append((path, False))
            continue
        path.write_bytes(make())
        results.append((path, True))
    return results

"""Latents and the noise added to them: the VAE cache (in memory and on disk) and kohya's
noise options (offset, adaptive offset, multi-resolution pyramid).

The cache holds the latent distribution, not one sample of it, so a cached run draws the same
samples from the training generator as one that encodes every step.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from services.trainer.data import TrainExample, image_hash, tensor_bytes, to_tensor

Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def vae_digest(vae: Any) -> str:
    """A hash of the VAE's weights: a disk cache entry is valid only for the VAE that made it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def cache_latents(fitted: Mapping[tuple[int, tuple[int, int]], Image.Image], examples: Sequence[TrainExample],
                  *, encode: Encoder, cache_dir: Path | None,
                  digest: Callable[[], str]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Encode every fitted image once, before training, in memory and optionally on disk.

    A disk entry depends only on the image, size and VAE (``digest``, asked for only when a
    disk cache is used), so other runs on the same images reuse it.
    """
    latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for index, bucket in sorted(fitted):
        image = fitted[(index, bucket)]
        path = None
        if cache_dir is not None:
            key = f"{digest()[:16]}-{image_hash(examples[index].image, bucket)[:32]}"
            path = Path(cache_dir) / f"{key}.safetensors"
            if path.exists():
                from safetensors.torch import load_file

                stored = load_file(str(path))
                latents[index] = (stored["mean"], stored["std"])
                continue
        mean, std = encode(to_tensor(image)[None])
        latents[index] = (mean[0].cpu(), std[0].cpu())
        if path is not None:
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{uuid.uuid4().hex}.part")
            save_file({"mean": mean[0].cpu().contiguous(), "std": std[0].cpu().contiguous()}, str(tmp))
            os.replace(tmp, path)
    return latents


def training_noise(latents: torch.Tensor, generator: torch.Generator, device: torch.device, *,
                   noise_offset: float | None, adaptive_noise_scale: float | None,
                   multires_noise_iterations: int | None, multires_noise_discount: float) -> torch.Tensor:
    """The noise one step adds, drawn from ``generator`` in a fixed order (resume repeats it)."""
    batch, channels, height, width = latents.shape
    noise = torch.randn(latents.shape, generator=generator).to(device)
    if noise_offset:
        offset: float | torch.Tensor = noise_offset
        if adaptive_noise_scale:
            latent_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
            offset = (noise_offset + adaptive_noise_scale * latent_mean).clamp(min=0.0)
        noise = noise + offset * torch.randn((batch, channels, 1, 1), generator=generator).to(device)
    if multires_noise_iterations:
        # Pyramid noise: coarse noise upsampled and added with decaying weight.
        for level in range(1, multires_noise_iterations + 1):
            ratio = float(torch.rand((), generator=generator)) * 2 + 2
            h_level, w_level = max(1, int(height / ratio**level)), max(1, int(width / ratio**level))
            coarse = torch.randn((batch, channels, h_level, w_level), generator=generator).to(device)
            noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear") \
                * multires_noise_discount**level
            if h_level == 1 or w_level == 1:
                break
        noise = noise / noise.std()
    return noise

"""What one training step reads: examples expanded into items, batched per epoch, images sized
to their bucket, captions processed and encoded as kohya sd-scripts does.

Every function that draws randomness takes the generator it draws from, so the trainer that
owns (and saves) the generators decides what a resumed run repeats.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from services.trainer.errors import TrainingRefused
from shared.training import SubsetOptions  # the same model the gateway validates


@dataclass
class TrainExample:
    """An image and its caption; ``bucket`` is its (width, height) training size.

    ``dataset_dir`` names the subset in the metadata (kohya's ``<repeats>_<name>`` folder);
    left empty it is derived from ``repeats`` and ``is_reg``.
    """

    image: Image.Image
    caption: str
    repeats: int = 1
    is_reg: bool = False
    bucket: tuple[int, int] | None = None
    dataset_dir: str = ""
    # kohya's per-[[datasets]] batching (None: the TrainConfig's) and per-subset caption and
    # augmentation options (None: the TrainConfig's); batches never mix datasets
    dataset: int = 0
    batch_size: int | None = None
    resolution: tuple[int, int] | None = None
    options: SubsetOptions | None = None

    def subset(self) -> str:
        return self.dataset_dir or f"{self.repeats}_{'reg' if self.is_reg else 'img'}"


@dataclass
class Item:
    """One image in the epoch's list; an example with ``repeats`` = 3 gives three."""

    example: int
    bucket: tuple[int, int]
    is_reg: bool
    dataset: int = 0


# ------------------------------------------------------------------ images


def cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover ``size`` keeping the aspect ratio; what sticks out is cropped per use."""
    image = image.convert("RGB")
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    return image.resize(resized, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)


def crop(image: Image.Image, size: tuple[int, int], generator: torch.Generator | None = None) -> Image.Image:
    """The ``size`` window of a covering image: centred, as sd-scripts trims without
    ``random_crop``, or at an offset drawn from ``generator`` (kohya's ``random_crop``)."""
    spare_x, spare_y = image.width - size[0], image.height - size[1]
    if generator is None:
        left, top = spare_x // 2, spare_y // 2
    else:
        left = int(torch.randint(0, spare_x + 1, (), generator=generator))
        top = int(torch.randint(0, spare_y + 1, (), generator=generator))
    return image.crop((left, top, left + size[0], top + size[1]))


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover ``size`` and centre-crop, as sd-scripts does without random_crop."""
    return crop(cover(image, size), size)


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_hash(image: Image.Image, size: tuple[int, int]) -> str:
    digest = hashlib.sha256(f"{image.mode}:{image.size}:{size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())


def color_aug(image: Image.Image, rng: random.Random) -> Image.Image:
    """A small random hue shift (sd-scripts' color_aug shifts hue by up to 8 of 180 degrees)."""
    shift = rng.randint(-11, 11)  # of PIL's 256 hue steps
    hsv = np.asarray(image.convert("HSV"), dtype=np.int16).copy()
    hsv[..., 0] = (hsv[..., 0] + shift) % 256
    return Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")


# ------------------------------------------------------------------ items and batches


def seed_from(*parts: int) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def expand_items(examples: Sequence[TrainExample], default_bucket: tuple[int, int]) -> list[Item]:
    """One item per repeat of each example, refusing buckets the VAE cannot encode."""
    items: list[Item] = []
    for index, example in enumerate(examples):
        bucket = example.bucket or default_bucket
        if bucket[0] % 8 or bucket[1] % 8 or min(bucket) < 8:
            raise TrainingRefused(f"bucket {bucket} of example {index} is not a multiple of 8")
        items.extend(Item(index, bucket, example.is_reg, example.dataset)
                     for _ in range(max(1, example.repeats)))
    if not items:
        raise TrainingRefused("no training examples")
    return items


def epoch_batches(items: Sequence[Item], examples: Sequence[TrainExample], *, seed: int, epoch: int,
                  batch_size: int) -> list[list[Item]]:
    """This epoch's batches: same-size images together, in an order fixed by seed and epoch,
    so a resumed run needs only the position within the epoch."""
    generator = torch.Generator().manual_seed(seed_from(seed, epoch))
    by_bucket: dict[tuple[int, tuple[int, int]], list[Item]] = {}
    for item in items:
        by_bucket.setdefault((item.dataset, item.bucket), []).append(item)
    batches: list[list[Item]] = []
    for key in sorted(by_bucket):
        members = by_bucket[key]
        order = torch.randperm(len(members), generator=generator).tolist()
        shuffled = [members[i] for i in order]
        size = examples[members[0].example].batch_size or batch_size
        batches.extend(shuffled[i:i + size] for i in range(0, len(shuffled), size))
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


# ------------------------------------------------------------------ captions


def process_caption(caption: str, options: SubsetOptions, rng: random.Random) -> str:
    """The text one step trains on, as kohya's ``process_caption``: prefix and suffix
    added, then dropped whole at ``caption_dropout_rate``, else its tags shuffled after the
    first ``keep_tokens`` (split at ``caption_separator``, joined with ", ")."""
    if options.caption_prefix:
        caption = options.caption_prefix + " " + caption
    if options.caption_suffix:
        caption = caption + " " + options.caption_suffix
    if options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate:
        return ""
    if not options.shuffle_caption:
        return caption
    tokens = [token.strip() for token in caption.split(options.caption_separator) if token.strip()]
    fixed, rest = tokens[:options.keep_tokens], tokens[options.keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(fixed + rest)


def token_chunks(tokenizer: Any, captions: list[str], max_token_length: int) -> torch.Tensor:
    """Token ids ``(batch, chunks, model_max_length)``, as kohya's ``get_input_ids``.

    With ``max_token_length`` 150 or 225 a caption is tokenized to that length plus BOS and
    EOS, then cut into 75-token pieces, each wrapped in BOS ... EOS so the text encoder
    (built for 77 positions) can read it.
    """
    window = tokenizer.model_max_length  # 77: BOS, 75 tokens, EOS
    length = max_token_length + 2
    ids: torch.Tensor = tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                                  return_tensors="pt").input_ids
    if length <= window:
        return ids[:, None, :]
    inner = window - 2
    chunks = [torch.cat([ids[:, :1], ids[:, start:start + inner], ids[:, -1:]], dim=1)
              for start in range(1, length - 1, inner)]
    return torch.stack(chunks, dim=1)


def text_embeddings(text_encoder: Any, chunked: torch.Tensor, *, device: torch.device,
                    clip_skip: int | None, trainable: bool) -> torch.Tensor:
    """The UNet's conditioning; for long captions kohya's concatenation of the chunks'
    states: the first BOS, each chunk's 75 token states, the last EOS."""
    batch, count, window = chunked.shape
    tokens = chunked.reshape(batch * count, window).to(device)
    grad: AbstractContextManager[Any] = nullcontext() if trainable else torch.no_grad()
    with grad:
        skip = clip_skip or 1
        if skip == 1:
            hidden: torch.Tensor = text_encoder(tokens)[0]
        else:
            output = text_encoder(tokens, output_hidden_states=True)
            norm = text_encoder.text_model.final_layer_norm if hasattr(text_encoder, "text_model") \
                else text_encoder.final_layer_norm
            hidden = norm(output.hidden_states[-skip])
        if count == 1:
            return hidden
        states = hidden.reshape(batch, count, window, -1)
        return torch.cat([states[:, 0, :1], *(states[:, i, 1:-1] for i in range(count)),
                          states[:, -1, -1:]], dim=1)

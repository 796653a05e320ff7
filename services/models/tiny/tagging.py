"""Tiny captioner and tagger models with random weights, for tests, the demo and benchmarks.

Each is written to the model cache in the very layout its real counterpart has, and then
loaded through the same code path as real weights:

* ``tiny-blip`` is what ``save_pretrained`` leaves for Salesforce/blip-image-captioning-large:
  a ``BlipForConditionalGeneration`` and a ``BlipProcessor`` (BLIP image processor + BERT
  WordPiece tokenizer with BLIP's added ``[DEC]`` start token). It writes random words.
* ``tiny-wd14`` is what SmilingWolf's wd-v1-4 taggers ship: ``model.onnx`` taking a batch of
  NHWC float32 BGR pixels in 0..255 (the side length is in the input shape) and returning
  sigmoid probabilities, plus ``selected_tags.csv`` (tag_id,name,category,count; category
  9 = rating, 0 = general, 4 = character) naming the outputs in order.

Every builder seeds itself, so a model holds the same weights on every machine and run.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from services.models.cache import build_into_cache

TINY_SEED = 0
# A folder holding one of these is a whole model: builds land in the cache by one atomic rename.
_ROOT_FILES = ("config.json", "model.onnx")

BLIP_IMAGE_SIZE = 64
WD14_IMAGE_SIZE = 64

# bert-base-uncased starts with these, and BLIP's tokenizer adds [DEC] (its decoder's start
# token) and [ENC] after the WordPiece vocabulary.
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_CAPTION_WORDS = (
    "a an the of on in with and at near under next to two three "
    "cat dog girl boy man woman people bird horse child "
    "sitting standing walking holding wearing looking lying "
    "red blue green white black yellow brown small large old young "
    "tree sky house car street field water table book flower room beach mountain road grass "
    "shirt hat dress hair window wall city snow"
).split()

# (name, category, count): WD14's layout, ratings first, then general tags, then characters.
# Names keep Danbooru's spelling (underscores, a kaomoji, qualifiers in parentheses).
WD14_TAGS: tuple[tuple[str, int, int], ...] = (
    ("general", 9, 800000),
    ("sensitive", 9, 500000),
    ("questionable", 9, 200000),
    ("explicit", 9, 100000),
    ("1girl", 0, 4000000),
    ("solo", 0, 3500000),
    ("long_hair", 0, 2800000),
    ("smile", 0, 2400000),
    ("looking_at_viewer", 0, 2200000),
    ("open_mouth", 0, 1600000),
    ("blue_eyes", 0, 1200000),
    ("simple_background", 0, 1100000),
    ("white_background", 0, 900000),
    ("outdoors", 0, 500000),
    ("sky", 0, 400000),
    ("^_^", 0, 60000),
    ("hatsune_miku", 4, 90000),
    ("hakurei_reimu", 4, 70000),
    ("kirisame_marisa", 4, 60000),
    ("saber_(fate)", 4, 30000),
)
# Logit spread on typical images: sigmoid(N(0, 2.5^2)) covers most of 0..1, so a threshold
# sweep keeps changing how many tags pass.
_WD14_LOGIT_STD = 2.5


def _save_tiny_blip(target: Path) -> None:
    """A BLIP captioner small enough to build in a second.

    Random cross-attention at BERT's usual 0.02 scale lets no image reach the words, so every
    image would get the same caption; it is redrawn larger so the caption follows the
    image. The decoder's output bias rules out the special tokens a trained BLIP never
    writes mid-caption, so a caption is never empty once special tokens are skipped.
    """
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    vocab = [*_BERT_SPECIALS, *_CAPTION_WORDS]
    target.mkdir(parents=True, exist_ok=True)
    # transformers 5 tokenizers take their vocabulary files from a folder, as from a snapshot.
    (target / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(target)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    processor_cls: Any = BlipProcessor  # untyped in transformers
    processor = processor_cls(
        image_processor=BlipImageProcessorPil(size={"height": BLIP_IMAGE_SIZE, "width": BLIP_IMAGE_SIZE}),
        tokenizer=tokenizer,
    )
    pad_id, sep_id = vocab.index("[PAD]"), vocab.index("[SEP]")
    config = BlipConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": sep_id, "sep_token_id": sep_id,
            "pad_token_id": pad_id,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": BLIP_IMAGE_SIZE, "patch_size": 16, "initializer_range": 0.02,
        },
        projection_dim=32, image_text_hidden_size=32,
    )
    torch.manual_seed(TINY_SEED)
    model = BlipForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(TINY_SEED)
    never_written = [tokenizer.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[MASK]",
                                                                   "[DEC]", "[ENC]")]
    with torch.no_grad():
        for name, param in model.text_decoder.named_parameters():
            if "crossattention" in name and param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        model.text_decoder.cls.predictions.bias[never_written] = -1e4
    model.save_pretrained(target, safe_serialization=True)
    processor.save_pretrained(target)


class _TinyWd14(torch.nn.Module):
    """A few strided convolutions, global pooling and one linear layer per tag.

    It takes what the real taggers take, NHWC BGR floats in 0..255, and converts inside the
    graph, so the caller's preprocessing is the real one.
    """

    def __init__(self, num_tags: int) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(32 * 2, num_tags)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2) / 127.5 - 1.0
        x = self.features(x)
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)  # type: ignore[no-any-return]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(pixels))


def _calibration_images(count: int, size: int) -> list[Image.Image]:
    """Photos and drawings stand-ins: flat colours, gradients, shapes and noise, seeded."""
    rng = np.random.default_rng(TINY_SEED)
    images: list[Image.Image] = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            images.append(Image.fromarray(pixels))
            continue
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if kind == 1:
            images.append(Image.new("RGB", (size, size), colour))
            continue
        if kind == 2:
            ramp = np.linspace(0, 1, size, dtype=np.float32)[None, :, None]
            end = rng.integers(0, 256, 3).astype(np.float32)
            blend = np.asarray(colour, np.float32) * (1 - ramp) + end * ramp
            pixels = np.broadcast_to(blend, (size, size, 3))
            images.append(Image.fromarray(pixels.astype(np.uint8)))
            continue
        image = Image.new("RGB", (size, size), colour)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = (int(v) for v in rng.integers(0, size - 8, 2))
            x1, y1 = x0 + int(rng.integers(4, size - x0)), y0 + int(rng.integers(4, size - y0))
            draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        images.append(image)
    return images


def _calibrate(model: _TinyWd14, generator: torch.Generator) -> None:
    """Rescale the head so each tag's logit has the same spread over typical images.

    Random convolutions give features that differ little between images, so raw
    probabilities sit in a narrow band and any threshold keeps either all or none of a
    tag. Standardising each logit over a fixed image set, plus a per-tag offset (some tags
    are common, some rare), makes probabilities depend on the image across 0..1.
    """
    images = _calibration_images(64, WD14_IMAGE_SIZE)
    batch = torch.from_numpy(np.stack([np.asarray(i, np.float32)[:, :, ::-1] for i in images]))
    with torch.no_grad():
        logits = model.logits(batch)
        mean, std = logits.mean(dim=0), logits.std(dim=0).clamp_min(1e-6)
        scale = _WD14_LOGIT_STD / std
        offset = torch.rand(mean.shape, generator=generator) * 2.0 - 1.0
        model.head.weight.mul_(scale[:, None])
        model.head.bias.copy_((model.head.bias - mean) * scale + offset)


def _write_selected_tags(path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for index, (name, category, count) in enumerate(WD14_TAGS):
            writer.writerow([9999990 + index if category == 9 else 1000 + index, name, category, count])


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs a warning per torchvision operator it cannot register (we have no
    torchvision, and need none) and torch.export a FutureWarning about its own internals."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _save_tiny_wd14(target: Path) -> None:
    """Export the tiny tagger with a dynamic batch axis, as the real taggers have."""
    torch.manual_seed(TINY_SEED)
    model = _TinyWd14(len(WD14_TAGS)).eval()
    _calibrate(model, torch.Generator().manual_seed(TINY_SEED))
    target.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, WD14_IMAGE_SIZE, WD14_IMAGE_SIZE, 3)
    with _quiet_exporter():
        torch.onnx.export(
            model, (example,), str(target / "model.onnx"), input_names=["input"], output_names=["output"],
            dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}}, dynamo=True, external_data=False,
            verbose=False,
        )
    _write_selected_tags(target / "selected_tags.csv")


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-blip": _save_tiny_blip,
    "tiny-wd14": _save_tiny_wd14,
}


def _is_built(target: Path) -> bool:
    return any((target / name).exists() for name in _ROOT_FILES)


def ensure_tagger_model(name: str, cache_dir: Path) -> Path:
    """Build ``name`` into the cache unless it is there; safe when several workers race."""
    return build_into_cache(name, cache_dir, builders=BUILDERS, is_built=_is_built)

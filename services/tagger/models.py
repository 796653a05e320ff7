"""Captioning (BLIP) and tagging (WD14) models, loaded once per process and run in batches.

Both take a model folder laid out as the real models ship: a BLIP snapshot
(Salesforce/blip-image-captioning-large or a tiny one from ``services.models.tiny.tagging``) loads with
``from_pretrained``; a WD14 tagger is a folder holding ``model.onnx`` and ``selected_tags.csv``
(any of SmilingWolf's wd-v1-4 / wd-*-tagger-v3 models). Tiny and real models go through the
same code.

One bad image must not cost the rest of its batch: every image is decoded and preprocessed
on its own, and ``caption_each`` / ``tag_each`` return an exception in that image's place.
``caption`` / ``tag`` are the strict variants, raising ``ImageFailed`` for the first bad one.
"""

from __future__ import annotations

import csv
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
DEFAULT_THRESHOLD = 0.35
WD14_MODEL_FILE = "model.onnx"
WD14_TAGS_FILE = "selected_tags.csv"
# selected_tags.csv categories; anything else (artist, copyright, meta in some exports) is
# reported with the general tags.
RATING_CATEGORY = 9
CHARACTER_CATEGORY = 4

_T = TypeVar("_T")
FloatArray = npt.NDArray[np.float32]


class ImageFailed(Exception):
    """One input image could not be captioned or tagged; ``index`` is its position."""

    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(f"image {index}: {type(cause).__name__}: {cause}")
        self.index = index


def _flatten_rgb(image: Image.Image) -> Image.Image:
    """Decode fully and drop transparency onto white, as WD14 was trained (and BLIP reads RGB)."""
    image.load()  # a truncated file fails here, for this image only
    if image.mode == "RGB":
        return image
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _strict(results: list[_T | Exception]) -> list[_T]:
    values: list[_T] = []
    for index, result in enumerate(results):
        if isinstance(result, Exception):
            raise ImageFailed(index, result) from result
        values.append(result)
    return values


def _run_batches(
    prepared: Sequence[_T | Exception], batch_size: int, run: Callable[[list[_T]], list[Any]],
) -> list[Any]:
    """Run ``run`` over batches of the prepared inputs, keeping failed ones in their place.

    When a whole batch fails, its images are retried one at a time, so only the image
    that breaks the model is reported failed.
    """
    results: list[Any] = list(prepared)
    good = [i for i, item in enumerate(prepared) if not isinstance(item, Exception)]
    for start in range(0, len(good), batch_size):
        indices = good[start:start + batch_size]
        batch: list[_T] = [prepared[i] for i in indices]  # type: ignore[misc]
        try:
            outputs = run(batch)
        except Exception as exc:
            if len(batch) == 1:
                results[indices[0]] = exc
                continue
            logger.warning("batch of %d failed (%s); retrying image by image", len(batch), exc)
            outputs = []
            for item in batch:
                try:
                    outputs.extend(run([item]))
                except Exception as single_exc:
                    outputs.append(single_exc)
        for index, output in zip(indices, outputs, strict=True):
            results[index] = output
    return results


class _PerImageSampling:
    """Nucleus sampling with one random stream per image, as a logits processor for greedy search.

    Adding Gumbel noise to log-probabilities and taking the argmax draws from the softmax
    (the Gumbel-max trick). Drawing the noise from a generator per image, each seeded with
    the same seed, makes an image's sampled caption depend on the image and the seed only,
    never on which images share its batch or on the batch size.
    """

    def __init__(self, generators: list[torch.Generator], top_p: float) -> None:
        self._generators = generators
        self._top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        logprobs = torch.log_softmax(scores.float(), dim=-1)
        if self._top_p < 1.0:
            sorted_lp, order = torch.sort(logprobs, descending=True, dim=-1)
            probs = sorted_lp.exp()
            # Keep the most likely tokens until their mass reaches top_p; the first always stays.
            drop_sorted = (probs.cumsum(dim=-1) - probs) >= self._top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logprobs = logprobs.masked_fill(drop, -math.inf)
        uniform = torch.stack([
            torch.rand(scores.shape[-1], generator=generator) for generator in self._generators
        ]).clamp_(1e-12, 1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(uniform))
        return logprobs + gumbel.to(logprobs.device)


class Captioner:
    """A BLIP captioning model and its processor, loaded once and reused for every call."""

    def __init__(
        self, model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
    ) -> None:
        import torch
        import transformers

        # transformers' partial annotations (decorated from_pretrained, untyped processors)
        # would need a cast at every call; the model and processor are used as Any instead.
        library: Any = transformers
        source = str(model_dir)
        kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
        self.model: Any = library.BlipForConditionalGeneration.from_pretrained(source, **kwargs)
        self.model.to(device).eval()
        self.processor: Any = library.BlipProcessor.from_pretrained(source)
        self.device = torch.device(device)
        self._dtype = self.model.dtype
        # generate() is not safe to run concurrently on one model.
        self._lock = threading.Lock()

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        pixels = self.processor.image_processor(images=[_flatten_rgb(image)], return_tensors="pt")
        return pixels["pixel_values"][0]  # type: ignore[no-any-return]

    def caption_each(
        self,
        images: Sequence[Image.Image],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int = 40,
        min_length: int = 5,
        num_beams: int = 1,
        do_sample: bool = False,
        top_p: float = 0.9,
        seed: int = 0,
    ) -> list[str | Exception]:
        """Captions in input order; an image that fails gets its exception instead.

        Greedy and beam search are deterministic; sampling draws from one stream per image
        seeded with ``seed``, so every mode gives an image the same caption whatever the
        batch size and batch mates. ``max_length``/``min_length`` count tokens including
        the start token, as BLIP's ``generate`` does.
        """
        import torch

        _check_batch_size(batch_size)
        if do_sample and num_beams > 1:
            raise ValueError("sampling is done per image with greedy search; use num_beams=1 with do_sample")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be within (0, 1], got {top_p}")
        if not 1 <= min_length <= max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {min_length} and {max_length}")

        prepared: list[torch.Tensor | Exception] = []
        for image in images:
            try:
                prepared.append(self._pixels(image))
            except Exception as exc:
                prepared.append(exc)

        def run(batch: list[torch.Tensor]) -> list[str]:
            pixel_values = torch.stack(batch).to(self.device, self._dtype)
            options: dict[str, Any] = {"max_length": max_length, "min_length": min_length,
                                       "num_beams": num_beams, "do_sample": False}
            if do_sample:
                generators = [torch.Generator().manual_seed(seed) for _ in batch]
                options["logits_processor"] = [_PerImageSampling(generators, top_p)]
            with self._lock, torch.inference_mode():
                tokens = self.model.generate(pixel_values=pixel_values, **options)
            texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
            return [str(text).strip() for text in texts]

        results: list[str | Exception] = _run_batches(prepared, batch_size, run)
        for index, result in enumerate(results):
            if isinstance(result, Exception):
                logger.warning("captioning image %d failed: %s: %s", index, type(result).__name__, result)
        return results

    def caption(
        self,
        images: Sequence[Image.Image],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int = 40,
        min_length: int = 5,
        num_beams: int = 1,
        do_sample: bool = False,
        top_p: float = 0.9,
        seed: int = 0,
    ) -> list[str]:
        """Captions in input order; raises ``ImageFailed`` for the first image that fails."""
        return _strict(self.caption_each(
            images, batch_size=batch_size, max_length=max_length, min_length=min_length,
            num_beams=num_beams, do_sample=do_sample, top_p=top_p, seed=seed,
        ))


@dataclass(frozen=True)
class TagResult:
    """One image's WD14 output; tags keep the CSV spelling and are sorted most likely first."""

    rating: dict[str, float]
    general: list[tuple[str, float]]
    character: list[tuple[str, float]]

    @property
    def top_rating(self) -> str | None:
        return max(self.rating, key=self.rating.__getitem__) if self.rating else None


@dataclass(frozen=True)
class TagSpec:
    name: str
    category: int


def read_selected_tags(path: Path) -> list[TagSpec]:
    """The model's output labels, in output order, from a WD14 ``selected_tags.csv``."""
    with path.open(newline="", encoding="utf-8") as handle:
        return [TagSpec(name=row["name"], category=int(row["category"])) for row in csv.DictReader(handle)]


def wd14_pixels(image: Image.Image, size: int) -> FloatArray:
    """WD14 preprocessing: white-padded square, resized to ``size``, BGR float32 in 0..255 (HWC)."""
    image = _flatten_rgb(image)
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError("empty image")
    side = max(width, height)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    rgb = np.asarray(square, dtype=np.float32)
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _default_providers() -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class Tagger:
    """A WD14 ONNX tagger: one onnxruntime session per process, safe to call from several threads."""

    def __init__(
        self, model_dir: str | Path, *, providers: list[str] | None = None,
        intra_op_num_threads: int | None = None,
    ) -> None:
        import onnxruntime

        folder = Path(model_dir)
        options = onnxruntime.SessionOptions()
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        self.session = onnxruntime.InferenceSession(
            str(folder / WD14_MODEL_FILE), sess_options=options, providers=providers or _default_providers(),
        )
        model_input = self.session.get_inputs()[0]
        self.input_name: str = model_input.name
        self.output_name: str = self.session.get_outputs()[0].name
        shape = model_input.shape
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise ValueError(f"expected a WD14 model taking NHWC square BGR images, got input shape {shape}")
        self.size: int = shape[1]
        # Some exports fix the batch at 1; larger batches are then split to fit.
        self.max_batch_size: int | None = shape[0] if isinstance(shape[0], int) else None
        self.tags = read_selected_tags(folder / WD14_TAGS_FILE)
        outputs = self.session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != len(self.tags):
            raise ValueError(
                f"{WD14_TAGS_FILE} names {len(self.tags)} tags but the model has {outputs[-1]} outputs")

    def _predict(self, batch: list[FloatArray]) -> list[FloatArray]:
        (probs,) = self.session.run([self.output_name], {self.input_name: np.stack(batch)})
        return list(np.asarray(probs, dtype=np.float32))

    def probabilities_each(
        self, images: Sequence[Image.Image], *, batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> list[FloatArray | Exception]:
        """Raw per-tag probabilities (CSV order), one ``session.run`` per batch."""
        _check_batch_size(batch_size)
        if self.max_batch_size is not None:
            batch_size = min(batch_size, self.max_batch_size)
        prepared: list[FloatArray | Exception] = []
        for image in images:
            try:
                prepared.append(wd14_pixels(image, self.size))
            except Exception as exc:
                prepared.append(exc)
        return _run_batches(prepared, batch_size, self._predict)

    def _result(self, probs: FloatArray, general_threshold: float, character_threshold: float) -> TagResult:
        rating: dict[str, float] = {}
        general: list[tuple[str, float]] = []
        character: list[tuple[str, float]] = []
        for spec, value in zip(self.tags, probs.tolist(), strict=True):
            if spec.category == RATING_CATEGORY:
                rating[spec.name] = value
            elif spec.category == CHARACTER_CATEGORY:
                if value >= character_threshold:
                    character.append((spec.name, value))
            elif value >= general_threshold:
                general.append((spec.name, value))
        # Stable sorts: equal probabilities keep the CSV order.
        general.sort(key=lambda item: -item[1])
        character.sort(key=lambda item: -item[1])
        return TagResult(rating=rating, general=general, character=character)

    def tag_each(
        self,
        images: Sequence[Image.Image],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        general_threshold: float = DEFAULT_THRESHOLD,
        character_threshold: float = DEFAULT_THRESHOLD,
    ) -> list[TagResult | Exception]:
        """Tags in input order; a tag is kept when its probability is at least its threshold."""
        for name, value in (("general_threshold", general_threshold),
                            ("character_threshold", character_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        results: list[TagResult | Exception] = []
        for index, probs in enumerate(self.probabilities_each(images, batch_size=batch_size)):
            if isinstance(probs, Exception):
                logger.warning("tagging image %d failed: %s: %s", index, type(probs).__name__, probs)
                results.append(probs)
            else:
                results.append(self._result(probs, general_threshold, character_threshold))
        return results

    def tag(
        self,
        images: Sequence[Image.Image],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        general_threshold: float = DEFAULT_THRESHOLD,
        character_threshold: float = DEFAULT_THRESHOLD,
    ) -> list[TagResult]:
        """Tags in input order; raises ``ImageFailed`` for the first image that fails."""
        return _strict(self.tag_each(images, batch_size=batch_size, general_threshold=general_threshold,
                                     character_threshold=character_threshold))

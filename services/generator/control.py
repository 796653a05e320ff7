"""ControlNet conditioning images: built-in preprocessors that need nothing downloaded.

The gateway's preprocess endpoint imports this module too, and the gateway never installs
torch, so nothing heavy is imported at module level: OpenPose rendering and keypoint parsing
need only Pillow, canny and scribble import numpy and OpenCV when called, and depth imports
transformers when called. Detector-based OpenPose goes through ``controlnet_aux`` only where
that optional extra and its weights exist (GPU images); everywhere else callers send keypoints
or a ready pose image instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import threading
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from services.generator.poses import (
    COLORS,
    DEFAULT_MIN_CONFIDENCE,
    LIMB_BRIGHTNESS,
    LIMBS,
    render_openpose,
    to_openpose_json,
)
from shared.poses import (
    KEYPOINT_NAMES,
    MAX_CANVAS_SIDE,
    NUM_KEYPOINTS,
    Keypoint,
    Person,
    PreprocessError,
    _require_float,
    _require_int,
    parse_openpose_json,
)

# Reading keypoints lives in shared/ (the gateway validates them), drawing them in
# services.generator.poses; both stay part of the preprocessors' API here.
__all__ = [
    "COLORS", "DEFAULT_MIN_CONFIDENCE", "KEYPOINT_NAMES", "KINDS", "LIMBS", "LIMB_BRIGHTNESS",
    "MAX_CANVAS_SIDE", "NUM_KEYPOINTS", "Keypoint", "Person", "PreprocessError",
    "PreprocessUnavailable", "canny", "check_params", "controlnet_aux_available", "depth",
    "openpose_from_photo", "parse_openpose_json", "preprocess", "render_openpose", "scribble",
    "to_openpose_json", "to_rgb", "default_stroke_width",
]

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

logger = logging.getLogger(__name__)


KINDS = frozenset({"canny", "scribble", "depth", "openpose"})

# The directory under the model cache that holds a depth-estimation model when a request names
# none. Deployments put a real one (DPT, Depth Anything) there; tests use the tiny random DPT.
DEFAULT_DEPTH_MODEL = "tiny-dpt"
# Where controlnet_aux's OpenPose weights live under the model cache (the layout of the
# lllyasviel/Annotators repository, which its ``from_pretrained`` reads from a directory).
OPENPOSE_WEIGHTS_DIR = "annotators"
OPENPOSE_WEIGHT_FILES = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")

_DETECTOR_HINT = (
    "detector-based openpose needs the optional `controlnet-aux` extra and its weights in the "
    "model cache; send a ready pose image with `preprocess: false`, or keypoints"
)
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


class PreprocessUnavailable(PreprocessError):
    """The preprocessor exists but cannot run on this machine (missing extra, model or weights)."""


# --------------------------------------------------------------------------------------------
# Shared helpers


def _cv2() -> Any:
    """Import OpenCV on first use so the gateway can import this module without it."""
    try:
        return importlib.import_module("cv2")
    except ImportError as exc:
        raise PreprocessUnavailable(
            "canny and scribble need OpenCV (opencv-python-headless, part of the worker extra)"
        ) from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white: a transparent PNG's hidden pixels are arbitrary and would
    otherwise show up as edges."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _gray(image: Image.Image) -> npt.NDArray[np.uint8]:
    import numpy as np

    return np.asarray(to_rgb(image).convert("L"), dtype=np.uint8)


def _mask_to_rgb(mask: npt.NDArray[np.uint8]) -> Image.Image:
    return Image.fromarray(mask).convert("RGB")


# --------------------------------------------------------------------------------------------
# Canny and scribble


def canny(image: Image.Image, *, low: int = 100, high: int = 200) -> Image.Image:
    """Hard edges for the canny ControlNet, which was trained on exactly this: white on black."""
    low = _require_int("low", low, lo=0, hi=255)
    high = _require_int("high", high, lo=0, hi=255)
    if low > high:
        raise PreprocessError(f"canny thresholds are inverted: low ({low}) must not exceed high ({high})")
    edges = _cv2().Canny(_gray(image), low, high)
    return _mask_to_rgb(edges)


def default_stroke_width(width: int, height: int) -> int:
    """About 3 px at 512 px: the stroke weight of the drawings the scribble ControlNet saw."""
    return max(2, round(min(width, height) / 170))


def scribble(image: Image.Image, *, threshold: int = 100, stroke: int | None = None) -> Image.Image:
    """Turn a photo or a line drawing into thick, sparse strokes like a hand scribble.

    The blur removes texture so only outlines survive; thin Canny edges are then thickened to
    a drawn-stroke width, and specks shorter than a few stroke widths are dropped because the
    scribble ControlNet reads every isolated dot as something to draw. ``threshold`` is
    Canny's upper threshold (the lower is half of it): raise it for fewer strokes.
    """
    threshold = _require_int("threshold", threshold, lo=1, hi=255)
    cv2 = _cv2()
    import numpy as np

    gray = _gray(image)
    height, width = gray.shape
    stroke = default_stroke_width(width, height) if stroke is None else _require_int(
        "stroke", stroke, lo=1, hi=64)

    blur = 2 * max(1, round(min(width, height) / 256)) + 1  # odd kernel, 5 px at 512
    smoothed = cv2.GaussianBlur(gray, (blur, blur), 0)
    edges = cv2.Canny(smoothed, threshold // 2, threshold)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (stroke, stroke))
    strokes = cv2.dilate(edges, kernel)

    count, labels, stats, _ = cv2.connectedComponentsWithStats(strokes, connectivity=8)
    min_area = 4 * stroke * stroke
    keep = np.zeros(count, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area  # label 0 is the background
    mask = np.where(keep[labels], 255, 0).astype(np.uint8)
    return _mask_to_rgb(mask)


# --------------------------------------------------------------------------------------------
# Depth


_depth_pipelines: dict[tuple[str, str], tuple[Any, threading.Lock]] = {}
_depth_pipelines_lock = threading.Lock()


def _depth_pipeline(model_dir: Path, device: str) -> tuple[Any, threading.Lock]:
    """One pipeline per model and device: loading costs far more than a call."""
    key = (str(model_dir.resolve()), device)
    with _depth_pipelines_lock:
        entry = _depth_pipelines.get(key)
        if entry is None:
            if not (model_dir / "config.json").is_file():
                raise PreprocessUnavailable(
                    f"depth model {model_dir.name!r} is not in the model cache")
            from transformers import pipeline

            logger.info("loading depth model %s on %s", model_dir, device)
            entry = (pipeline("depth-estimation", model=str(model_dir), device=device),
                     threading.Lock())
            _depth_pipelines[key] = entry
        return entry


def depth(image: Image.Image, *, model_dir: Path, device: str = "cpu") -> Image.Image:
    """A relative depth map, near = bright, stretched to the full 0..255 range because depth
    ControlNets were trained on per-image normalised maps, not metric depth."""
    import numpy as np

    rgb = to_rgb(image)
    pipe, lock = _depth_pipeline(model_dir, device)
    with lock:  # transformers pipelines keep per-call state; one call at a time per pipeline
        result = pipe(rgb)
    predicted = result["predicted_depth"]
    values = np.asarray(predicted.detach().float().cpu().numpy(), dtype=np.float32).squeeze()
    if values.ndim != 2:
        raise PreprocessError(f"depth model returned a map of shape {values.shape}, expected 2-D")
    lo, hi = float(values.min()), float(values.max())
    # A flat prediction has no depth to show; mid-grey says so instead of dividing by zero.
    scaled = (values - lo) / (hi - lo) if hi - lo > 1e-8 else np.full_like(values, 0.5)
    gray = Image.fromarray(np.round(scaled * 255).astype(np.uint8))
    if gray.size != rgb.size:
        gray = gray.resize(rgb.size, Image.Resampling.BICUBIC)
    return gray.convert("RGB")


# --------------------------------------------------------------------------------------------
# OpenPose from a photo (optional detector)


@cache
def controlnet_aux_available() -> bool:
    """Whether ``controlnet_aux`` imports. It is tried for real, once, because a present but
    broken install (a torchvision that does not match torch) fails only on import."""
    if importlib.util.find_spec("controlnet_aux") is None:
        return False
    try:
        importlib.import_module("controlnet_aux")
    except Exception:  # any failure of a third-party import chain means "not usable here"
        logger.warning("controlnet_aux is installed but does not import", exc_info=True)
        return False
    return True


_detectors: dict[str, Any] = {}
_detectors_lock = threading.Lock()


def _openpose_detector(model_dir: Path) -> Any:
    key = str(model_dir.resolve())
    with _detectors_lock:
        detector = _detectors.get(key)
        if detector is None:
            from controlnet_aux import OpenposeDetector

            detector = OpenposeDetector.from_pretrained(str(model_dir))
            _detectors[key] = detector
        return detector


def openpose_from_photo(image: Image.Image, *, model_dir: Path | None) -> Image.Image:
    """Detect the pose in a photo; only where the detector extra and its weights are present,
    since fetching weights from a hub is not something a worker may do mid-job."""
    if not controlnet_aux_available():
        raise PreprocessUnavailable(f"controlnet-aux is not installed here: {_DETECTOR_HINT}")
    if model_dir is None or not all((model_dir / name).is_file() for name in OPENPOSE_WEIGHT_FILES):
        raise PreprocessUnavailable(f"the OpenPose detector weights are missing: {_DETECTOR_HINT}")
    rgb = to_rgb(image)
    detector = _openpose_detector(model_dir)
    resolution = min(max(rgb.size), 1024)
    pose = detector(rgb, detect_resolution=resolution, image_resolution=resolution,
                    include_hand=False, include_face=False, output_type="pil")
    result: Image.Image = pose.convert("RGB")
    if result.size != rgb.size:
        result = result.resize(rgb.size, Image.Resampling.BILINEAR)
    return result


# --------------------------------------------------------------------------------------------
# One entry point for the worker and the gateway


_PARAMS: dict[str, frozenset[str]] = {
    "canny": frozenset({"low", "high"}),
    "scribble": frozenset({"threshold", "stroke"}),
    "depth": frozenset({"model"}),
    "openpose": frozenset({"keypoints", "width", "height", "min_confidence"}),
}


def check_params(kind: str, params: Mapping[str, Any], *, has_image: bool) -> None:
    """Reject what cannot work before a job is queued: unknown kinds, unknown or mistyped
    parameters, a missing image. Cheap and torch-free so the gateway can call it at submit."""
    if kind not in KINDS:
        raise PreprocessError(f"unknown preprocessor {kind!r}; known: {', '.join(sorted(KINDS))}")
    unknown = sorted(set(params) - _PARAMS[kind])
    if unknown:
        raise PreprocessError(
            f"unknown parameter(s) for {kind}: {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(_PARAMS[kind])) or 'none'}")
    if kind == "canny":
        low = _require_int("low", params.get("low", 100), lo=0, hi=255)
        high = _require_int("high", params.get("high", 200), lo=0, hi=255)
        if low > high:
            raise PreprocessError(f"canny thresholds are inverted: low ({low}) must not exceed high ({high})")
    elif kind == "scribble":
        _require_int("threshold", params.get("threshold", 100), lo=1, hi=255)
        if params.get("stroke") is not None:
            _require_int("stroke", params["stroke"], lo=1, hi=64)
    elif kind == "depth":
        if "model" in params:
            _depth_model_name(params["model"])
    elif kind == "openpose":
        if "keypoints" in params:
            for name in ("width", "height"):
                if name in params:
                    _require_int(name, params[name], lo=1, hi=MAX_CANVAS_SIDE)
            if "min_confidence" in params:
                _require_float("min_confidence", params["min_confidence"])
            # The canvas size only matters for rendering; what counts here is whether there is one.
            fallback = (1, 1) if has_image or ("width" in params and "height" in params) else None
            parse_openpose_json(params["keypoints"], default_size=fallback)
            return
        if "width" in params or "height" in params or "min_confidence" in params:
            raise PreprocessError("width, height and min_confidence apply only to keypoints")
    if not has_image:
        raise PreprocessError(f"{kind} needs an image" + (" or keypoints" if kind == "openpose" else ""))


def _depth_model_name(value: object) -> str:
    # The name becomes a path under the model cache, so nothing that could climb out of it.
    if not isinstance(value, str) or not _MODEL_NAME.fullmatch(value) or ".." in value:
        raise PreprocessError(f"depth model must be a model-cache name like 'dpt-hybrid', got {value!r}")
    return value


def _default_canvas(params: Mapping[str, Any], image: Image.Image | None) -> tuple[int, int] | None:
    if "width" in params and "height" in params:
        return (_require_int("width", params["width"], lo=1, hi=MAX_CANVAS_SIDE),
                _require_int("height", params["height"], lo=1, hi=MAX_CANVAS_SIDE))
    return image.size if image is not None else None


def preprocess(kind: str, image: Image.Image | None, *, params: Mapping[str, Any],
               model_cache: Path) -> Image.Image:
    """Make the conditioning image for ``kind``; the same code for the worker and the gateway's
    preview endpoint so a preview shows exactly what generation will use.

    OpenPose renders ``params["keypoints"]`` (OpenPose JSON) when given, on the JSON's canvas,
    else on ``width``/``height``, else on the image's size; without keypoints it runs the
    detector on the image, which only GPU images with the controlnet-aux extra can do.
    """
    check_params(kind, params, has_image=image is not None)
    handlers: dict[str, Callable[[], Image.Image]] = {
        "canny": lambda: canny(_image(image), low=params.get("low", 100), high=params.get("high", 200)),
        "scribble": lambda: scribble(_image(image), threshold=params.get("threshold", 100),
                                     stroke=params.get("stroke")),
        "depth": lambda: depth(_image(image), model_dir=model_cache / _depth_model_name(
            params.get("model", DEFAULT_DEPTH_MODEL))),
        "openpose": lambda: _openpose(image, params, model_cache),
    }
    return handlers[kind]()


def _image(image: Image.Image | None) -> Image.Image:
    assert image is not None  # check_params refused a missing image
    return image


def _openpose(image: Image.Image | None, params: Mapping[str, Any], model_cache: Path) -> Image.Image:
    if "keypoints" not in params:
        return openpose_from_photo(_image(image), model_dir=model_cache / OPENPOSE_WEIGHTS_DIR)
    people, width, height = parse_openpose_json(params["keypoints"],
                                                default_size=_default_canvas(params, image))
    min_confidence = _require_float("min_confidence", params.get("min_confidence",
                                                                 DEFAULT_MIN_CONFIDENCE))
    return render_openpose(people, width=width, height=height, min_confidence=min_confidence)

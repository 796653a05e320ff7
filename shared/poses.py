"""OpenPose poses as data: reading OpenPose JSON keypoints and drawing the skeleton image.

Pure Python and Pillow, so the gateway validates keypoints before a job exists and the
worker draws exactly what was validated. The COCO-18 order and the colour per limb are part
of the format the openpose ControlNets were trained on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from PIL import Image, ImageDraw

Keypoint: TypeAlias = tuple[float, float, float]
Person: TypeAlias = list[Keypoint | None]

MAX_CANVAS_SIDE = 8192
DEFAULT_MIN_CONFIDENCE = 0.05

# COCO-18 order, as OpenPose writes it and as the openpose ControlNets were trained on.
KEYPOINT_NAMES = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
)
NUM_KEYPOINTS = len(KEYPOINT_NAMES)
# OpenPose's default BODY_25 output has a mid-hip and six foot points that COCO-18 lacks.
_BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)

# Limbs as keypoint index pairs; limb i is drawn in colour i, which is how the ControlNet tells
# left from right, so both the order and the palette are part of the format.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
# Full-saturation hues 20 degrees apart, starting at red; joint i uses colour i.
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
# Limbs are drawn dimmer than joints so the joints stay distinct where limbs meet.
LIMB_BRIGHTNESS = 0.6

class PreprocessError(ValueError):
    """Bad input for a preprocessor; the message is meant for the API client."""


def _require_int(name: str, value: object, *, lo: int, hi: int) -> int:
    """JSON gives floats for whole numbers sometimes and bools are ints to Python; accept the
    first and refuse the second so ``"low": true`` is not read as 1."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PreprocessError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise PreprocessError(f"{name} must be an integer, got {value!r}")
        value = int(value)
    if not lo <= value <= hi:
        raise PreprocessError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _require_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PreprocessError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# OpenPose from keypoints


def _person_from_flat(flat: object, index: int) -> Person:
    if not isinstance(flat, Sequence) or isinstance(flat, str | bytes):
        raise PreprocessError(f"people[{index}].pose_keypoints_2d must be a list of numbers")
    if len(flat) == 3 * NUM_KEYPOINTS:
        order: Sequence[int] = range(NUM_KEYPOINTS)
    elif len(flat) == 3 * 25:
        order = _BODY25_TO_COCO18
    else:
        raise PreprocessError(
            f"people[{index}].pose_keypoints_2d has {len(flat)} numbers; expected "
            f"{3 * NUM_KEYPOINTS} (18 COCO keypoints as x, y, confidence) or 75 (BODY_25)")
    values = [_require_float(f"people[{index}].pose_keypoints_2d[{i}]", v) for i, v in enumerate(flat)]
    person: Person = []
    for point in order:
        x, y, c = values[3 * point: 3 * point + 3]
        person.append((x, y, c) if c > 0 else None)
    return person


def parse_openpose_json(
    data: Mapping[str, Any], *, default_size: tuple[int, int] | None = None,
) -> tuple[list[Person], int, int]:
    """Read OpenPose's JSON (or the editors' variant with a canvas size) into pixel keypoints.

    Coordinates are taken as normalised when every present one is within 0..1, since a real
    pixel-space pose would never fit in a single pixel. ``default_size`` is the canvas when the
    JSON names none (OpenPose itself does not write one).
    """
    if not isinstance(data, Mapping):
        raise PreprocessError("keypoints must be an OpenPose JSON object")
    raw_people = data.get("people")
    if not isinstance(raw_people, Sequence) or isinstance(raw_people, str | bytes):
        raise PreprocessError("keypoints must have a `people` list")
    if not raw_people:
        raise PreprocessError("keypoints has no people")

    if "canvas_width" in data or "canvas_height" in data:
        width = _require_int("canvas_width", data.get("canvas_width"), lo=1, hi=MAX_CANVAS_SIDE)
        height = _require_int("canvas_height", data.get("canvas_height"), lo=1, hi=MAX_CANVAS_SIDE)
    elif default_size is not None:
        width, height = default_size
    else:
        raise PreprocessError("keypoints need canvas_width and canvas_height")

    people: list[Person] = []
    for index, raw in enumerate(raw_people):
        if not isinstance(raw, Mapping) or "pose_keypoints_2d" not in raw:
            raise PreprocessError(f"people[{index}] has no pose_keypoints_2d")
        people.append(_person_from_flat(raw["pose_keypoints_2d"], index))

    present = [p for person in people for p in person if p is not None]
    if not present:
        raise PreprocessError("keypoints has no keypoint with a confidence above 0")
    if all(0.0 <= x <= 1.0 and 0.0 <= y <= 1.0 for x, y, _ in present):
        people = [[None if p is None else (p[0] * width, p[1] * height, p[2]) for p in person]
                  for person in people]
    return people, width, height


def to_openpose_json(
    people: Sequence[Sequence[Keypoint | None]], *, width: int, height: int,
) -> dict[str, Any]:
    """The inverse of :func:`parse_openpose_json` (pixel coordinates, missing points as zeros),
    so a detected or edited pose can be stored and sent back as keypoints."""
    out_people = []
    for person in people:
        flat: list[float] = []
        for point in person:
            flat.extend((0.0, 0.0, 0.0) if point is None else (float(point[0]), float(point[1]),
                                                               float(point[2])))
        out_people.append({"pose_keypoints_2d": flat})
    return {"people": out_people, "canvas_width": width, "canvas_height": height}


def _limb_polygon(a: tuple[float, float], b: tuple[float, float], half_width: float,
                  segments: int = 24) -> list[tuple[float, float]]:
    """An ellipse spanning a to b; Pillow cannot rotate ellipses, so sample its outline."""
    cx, cy = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
    half_length = math.hypot(b[0] - a[0], b[1] - a[1]) / 2
    angle = math.atan2(b[1] - a[1], b[0] - a[0])
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    points = []
    for i in range(segments):
        t = 2 * math.pi * i / segments
        ex, ey = half_length * math.cos(t), half_width * math.sin(t)
        points.append((cx + ex * cos_a - ey * sin_a, cy + ex * sin_a + ey * cos_a))
    return points


def render_openpose(
    people: Sequence[Sequence[Keypoint | None]], *, width: int, height: int, normalized: bool = False,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE, stick_width: int | None = None,
) -> Image.Image:
    """Draw COCO-18 skeletons the way the openpose ControlNets saw them in training.

    Points below ``min_confidence`` are treated as missing, and a limb is drawn only when both
    of its ends are present, so an occluded arm disappears rather than pointing at the origin.
    Stick and joint size scale with the canvas (4 px at 512, as in the training images).
    """
    width = _require_int("width", width, lo=1, hi=MAX_CANVAS_SIDE)
    height = _require_int("height", height, lo=1, hi=MAX_CANVAS_SIDE)
    size = stick_width if stick_width is not None else max(1, round(min(width, height) / 128))
    sx, sy = (width, height) if normalized else (1, 1)

    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for index, person in enumerate(people):
        if len(person) != NUM_KEYPOINTS:
            raise PreprocessError(f"person {index} has {len(person)} keypoints; expected {NUM_KEYPOINTS}")
        points: list[tuple[float, float] | None] = []
        for point in person:
            if point is None or point[2] < min_confidence:
                points.append(None)
            else:
                points.append((point[0] * sx, point[1] * sy))

        for limb, (i, j) in enumerate(LIMBS):
            a, b = points[i], points[j]
            if a is None or b is None:
                continue
            color = tuple(int(c * LIMB_BRIGHTNESS) for c in COLORS[limb])
            draw.polygon(_limb_polygon(a, b, size), fill=color)
        for joint, xy in enumerate(points):
            if xy is None:
                continue
            x, y = xy
            draw.ellipse((x - size, y - size, x + size, y + size), fill=COLORS[joint])
    return canvas

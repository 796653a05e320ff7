"""OpenPose poses as data: reading OpenPose JSON keypoints into COCO-18 pixel points.

Pure Python, so the gateway validates keypoints before a job exists and the worker draws
(``services.generator.poses``) exactly what was validated. The COCO-18 order is part of the
format the openpose ControlNets were trained on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

Keypoint: TypeAlias = tuple[float, float, float]
Person: TypeAlias = list[Keypoint | None]

MAX_CANVAS_SIDE = 8192

# COCO-18 order, as OpenPose writes it and as the openpose ControlNets were trained on.
KEYPOINT_NAMES = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
)
NUM_KEYPOINTS = len(KEYPOINT_NAMES)
# OpenPose's default BODY_25 output has a mid-hip and six foot points that COCO-18 lacks.
_BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)


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

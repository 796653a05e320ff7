"""Drawing OpenPose skeletons, and writing detected poses back as OpenPose JSON.

Only the worker draws; reading keypoints stays in ``shared.poses`` because the gateway
validates them before a job exists. The colour per limb is part of the format the openpose
ControlNets were trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw

from shared.poses import MAX_CANVAS_SIDE, NUM_KEYPOINTS, Keypoint, PreprocessError, _require_int

DEFAULT_MIN_CONFIDENCE = 0.05

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


def to_openpose_json(
    people: Sequence[Sequence[Keypoint | None]], *, width: int, height: int,
) -> dict[str, Any]:
    """The inverse of :func:`shared.poses.parse_openpose_json` (pixel coordinates, missing
    points as zeros), so a detected or edited pose can be stored and sent back as keypoints."""
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

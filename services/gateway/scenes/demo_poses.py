"""The demo catalog's actions: five poses, each framed as a close, a medium and a far shot.

Kept as data the gateway-side installer can import without torch. Each pose is written once in
body units (standing height 1, ground at 0, y up, the figure's right on the image's left as a
camera facing it sees it) and framed into a 512x512 OpenPose keypoint file per shot; points the
frame cuts off get confidence 0, as OpenPose writes them. The descriptions are what an
embedding model matches a user's free text against, so they say what a person would ask for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CANVAS_SIZE = (512, 512)
SHOTS = ("close", "medium", "far")
SHOT_DESCRIPTIONS = {
    "close": "close-up: head, shoulders and upper body fill the frame",
    "medium": "medium shot: the figure from the knees up",
    "far": "far shot: the whole figure, small in the frame",
}
CONFIDENCE = 0.9

# Pixels per unit of standing height, and where the frame sits: a far figure stands on a line
# near the bottom; medium and close shots hang from the top of the head (or a raised hand).
_SCALE = {"close": 900.0, "medium": 560.0, "far": 180.0}
_GROUND_PX = 460.0
_TOP_PX = 24.0
_CROWN_ABOVE_TOP_POINT = 0.09

_Pose = tuple[tuple[float, float] | None, ...]

# COCO-18 order: nose, neck, r_shoulder, r_elbow, r_wrist, l_shoulder, l_elbow, l_wrist, r_hip,
# r_knee, r_ankle, l_hip, l_knee, l_ankle, r_eye, l_eye, r_ear, l_ear.
_STANDING: _Pose = (
    (0.0, 0.908), (0.0, 0.818), (-0.11, 0.818), (-0.125, 0.632), (-0.13, 0.486),
    (0.11, 0.818), (0.125, 0.632), (0.13, 0.486), (-0.055, 0.53), (-0.06, 0.285),
    (-0.065, 0.04), (0.055, 0.53), (0.06, 0.285), (0.065, 0.04), (-0.018, 0.935),
    (0.018, 0.935), (-0.042, 0.925), (0.042, 0.925),
)
_WAVING: _Pose = (
    (0.004, 0.908), (0.0, 0.818), (-0.11, 0.818), (-0.25, 0.9), (-0.27, 1.04),
    *_STANDING[5:14],
    (-0.014, 0.935), (0.022, 0.934), (-0.038, 0.925), (0.046, 0.924),
)
# Seen from its left, walking to the right of the image; the right ear is hidden.
_WALKING: _Pose = (
    (0.065, 0.905), (0.0, 0.818), (-0.015, 0.812), (0.065, 0.65), (0.14, 0.53),
    (0.015, 0.818), (-0.035, 0.643), (-0.07, 0.505), (-0.005, 0.53), (-0.045, 0.3),
    (-0.145, 0.08), (0.01, 0.53), (0.08, 0.3), (0.13, 0.06), (0.055, 0.933),
    (0.045, 0.935), None, (-0.01, 0.925),
)
# Seen from its left, sitting on a seat a quarter of its height up, hands on the thighs.
_SITTING: _Pose = (
    (-0.03, 0.675), (-0.09, 0.585), (-0.105, 0.58), (-0.09, 0.41), (0.04, 0.35),
    (-0.075, 0.585), (-0.06, 0.42), (0.07, 0.36), (-0.1, 0.3), (0.13, 0.29),
    (0.12, 0.05), (-0.08, 0.3), (0.155, 0.3), (0.16, 0.055), (-0.04, 0.7),
    (-0.05, 0.7), None, (-0.1, 0.695),
)
# The right arm held out level to the image's left, the head turned a little towards it.
_POINTING: _Pose = (
    (-0.012, 0.908), (0.0, 0.818), (-0.11, 0.818), (-0.295, 0.83), (-0.44, 0.84),
    *_STANDING[5:14],
    (-0.028, 0.935), (0.01, 0.935), (-0.048, 0.925), (0.036, 0.925),
)


@dataclass(frozen=True)
class DemoShot:
    """One framing of an action: OpenPose JSON (``shared.poses.parse_openpose_json`` reads it)
    and the placement that puts the figure on a background where this frame had it, keeping
    its proportions on a background of any shape."""

    shot: str
    description: str
    keypoints: dict[str, Any]
    placement: dict[str, float]


@dataclass(frozen=True)
class DemoAction:
    name: str
    description: str
    shots: Mapping[str, DemoShot]


def _frame(pose: _Pose, shot: str) -> DemoShot:
    """Lay a body-unit pose out on the shot's canvas; the placement is the same framing said
    as fractions (feet at the centre of the ankles, the lower one on the ground)."""
    width, height = CANVAS_SIZE
    scale = _SCALE[shot]
    present = [p for p in pose if p is not None]
    xs, ys = [p[0] for p in present], [p[1] for p in present]
    origin_x = width / 2 - scale * (min(xs) + max(xs)) / 2
    if shot == "far":
        origin_y = _GROUND_PX + scale * min(ys)
    else:
        origin_y = _TOP_PX + scale * (max(ys) + _CROWN_ABOVE_TOP_POINT)

    flat: list[float] = []
    for point in pose:
        if point is None:
            flat.extend((0.0, 0.0, 0.0))
            continue
        x, y = origin_x + scale * point[0], origin_y - scale * point[1]
        if 0 <= x < width and 0 <= y < height:
            flat.extend((round(x, 1), round(y, 1), CONFIDENCE))
        else:
            flat.extend((0.0, 0.0, 0.0))

    ankles = [p for p in (pose[10], pose[13]) if p is not None]
    feet_x = sum(p[0] for p in ankles) / len(ankles)
    feet_y = min(p[1] for p in ankles)
    placement = {"x": round((origin_x + scale * feet_x) / width, 4),
                 "y": round((origin_y - scale * feet_y) / height, 4),
                 "height": round(scale / height, 4)}
    return DemoShot(
        shot=shot, description=SHOT_DESCRIPTIONS[shot],
        keypoints={"people": [{"pose_keypoints_2d": flat}], "canvas_width": width,
                   "canvas_height": height},
        placement=placement,
    )


def _action(name: str, description: str, pose: _Pose) -> DemoAction:
    return DemoAction(name=name, description=description,
                      shots={shot: _frame(pose, shot) for shot in SHOTS})


DEMO_ACTIONS: tuple[DemoAction, ...] = (
    _action("standing", "a person standing upright and relaxed, facing the camera, arms hanging "
            "loosely at the sides", _STANDING),
    _action("waving", "a person standing and waving hello with one raised hand, facing the camera",
            _WAVING),
    _action("walking", "a person walking, seen from the side in mid-stride, one leg forward and the "
            "arms swinging", _WALKING),
    _action("sitting", "a person sitting on a bench or a chair, seen from the side, knees bent and "
            "hands resting on the thighs", _SITTING),
    _action("pointing", "a person standing and pointing at something to the side with an "
            "outstretched arm", _POINTING),
)

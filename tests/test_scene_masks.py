"""Masks drawn from a pose, placing a shot on a background, and the demo poses and places.

Pure Pillow, no models: every assertion is about pixels or coordinates.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.gateway.scenes.demo_places import DEMO_PLACES
from services.gateway.scenes.demo_poses import CANVAS_SIZE, DEMO_ACTIONS, SHOTS
from services.generator.poses import render_openpose
from services.generator.scenes.masks import (
    HEAD_POINTS,
    L_ANKLE,
    L_KNEE,
    R_ANKLE,
    R_KNEE,
    Figure,
    Placement,
    ShotAssets,
    body_mask,
    face_mask,
    figure_of,
    figure_of_mask,
    place_figure,
    standing_height,
)
from shared.poses import Person, PreprocessError, parse_openpose_json

REPO = Path(__file__).resolve().parents[1]
CASES = [(action.name, shot) for action in DEMO_ACTIONS for shot in SHOTS]
ACTIONS = {action.name: action for action in DEMO_ACTIONS}


def demo_people(action: str, shot: str) -> tuple[list[Person], tuple[int, int]]:
    people, width, height = parse_openpose_json(ACTIONS[action].shots[shot].keypoints)
    return people, (width, height)


def at(mask: Image.Image, point: tuple[float, float, float]) -> int:
    value = mask.getpixel((int(point[0]), int(point[1])))
    assert isinstance(value, int)
    return value


def area(mask: Image.Image) -> float:
    return float(np.asarray(mask, dtype=np.float64).mean() / 255)


@pytest.mark.parametrize(("action", "shot"), CASES)
def test_body_mask_covers_every_present_keypoint(action: str, shot: str) -> None:
    people, size = demo_people(action, shot)
    mask = body_mask(people, size)
    assert mask.mode == "L" and mask.size == size
    for index, point in enumerate(people[0]):
        if point is not None:
            assert at(mask, point) >= 250, f"{action}/{shot} keypoint {index} at {point[:2]}"


@pytest.mark.parametrize(("action", "shot"), CASES)
def test_face_mask_covers_the_head_and_not_the_legs(action: str, shot: str) -> None:
    people, size = demo_people(action, shot)
    mask = face_mask(people, size)
    assert mask.mode == "L" and mask.size == size
    person = people[0]
    for index in HEAD_POINTS:
        point = person[index]
        if point is not None:
            assert at(mask, point) >= 128, f"{action}/{shot} head point {index}"
    for index in (R_KNEE, L_KNEE, R_ANKLE, L_ANKLE):
        point = person[index]
        if point is not None:
            assert at(mask, point) == 0, f"{action}/{shot} leg point {index}"
    assert 0 < area(mask) < area(body_mask(people, size))


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_shot_types_frame_the_figure_at_different_sizes(action: str) -> None:
    body = {shot: area(body_mask(*demo_people(action, shot))) for shot in SHOTS}
    face = {shot: area(face_mask(*demo_people(action, shot))) for shot in SHOTS}
    assert body["close"] > body["medium"] > body["far"]
    assert face["close"] > face["medium"] > face["far"]


def test_demo_shots_crop_as_named() -> None:
    """Close-ups lose the feet (confidence 0, as OpenPose writes them), far shots show them."""
    for action in DEMO_ACTIONS:
        close, _ = demo_people(action.name, "close")
        far, _ = demo_people(action.name, "far")
        assert close[0][R_ANKLE] is None and close[0][L_ANKLE] is None
        assert far[0][R_ANKLE] is not None and far[0][L_ANKLE] is not None
        assert all(far[0][i] is not None for i in range(14)), action.name


def test_masks_are_feathered_and_the_options_change_them() -> None:
    people, size = demo_people("standing", "medium")
    default = np.asarray(body_mask(people, size))
    assert ((default > 0) & (default < 255)).any()
    assert ((np.asarray(face_mask(people, size)) > 0) & (np.asarray(face_mask(people, size)) < 255)).any()

    hard = np.asarray(body_mask(people, size, dilate_px=0, feather_px=0))
    assert set(np.unique(hard)) == {0, 255}
    wider = np.asarray(body_mask(people, size, dilate_px=30, feather_px=0))
    assert (wider == 255).sum() > (hard == 255).sum()
    assert ((wider == 255) | (hard == 0)).all()  # dilation only adds


def test_defaults_scale_with_the_figure() -> None:
    """The same pose at three times the size gets three times the margin, so the mask is the
    same shape: what the default dilation and feather are for."""
    people, size = demo_people("standing", "far")
    small = body_mask(people, size)
    big_people = [[None if p is None else (p[0] * 3, p[1] * 3, p[2]) for p in people[0]]]
    big = body_mask(big_people, (size[0] * 3, size[1] * 3))
    shrunk = np.asarray(big.resize(size, Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(shrunk - np.asarray(small, dtype=np.float64)).mean() < 2.0


def test_standing_height_ignores_pose_and_crop() -> None:
    for shot in SHOTS:
        heights = [standing_height(demo_people(action, shot)[0][0]) for action in ACTIONS]
        assert all(h is not None for h in heights)
        assert max(h for h in heights if h) / min(h for h in heights if h) < 1.03, shot


@pytest.mark.parametrize(("action", "shot"), CASES)
def test_placement_puts_the_feet_at_xy_and_scales_to_height(action: str, shot: str) -> None:
    people, size = demo_people(action, shot)
    pose = render_openpose(people, width=size[0], height=size[1])
    before = figure_of(people)
    placement = Placement(x=0.3, y=0.85, height=0.5)
    fitted = place_figure(ShotAssets(size, {"pose": pose}, people), (768, 512), placement)

    assert fitted.size == (768, 512) and fitted.images["pose"].size == (768, 512)
    assert fitted.people is not None
    after = figure_of(fitted.people)
    assert after.feet == pytest.approx((0.3 * 768, 0.85 * 512))
    assert after.height == pytest.approx(0.5 * 512)
    assert fitted.scale[0] == fitted.scale[1] == pytest.approx(0.5 * 512 / before.height)
    if people[0][R_ANKLE] is not None:
        lower_ankle = max(p[1] for p in (fitted.people[0][R_ANKLE], fitted.people[0][L_ANKLE]) if p)
        assert lower_ankle == pytest.approx(0.85 * 512)

    # The warped pose map still has each joint's dot where the keypoint went.
    warped = np.asarray(fitted.images["pose"], dtype=np.int32)
    for point in fitted.people[0]:
        if point is not None and 0 <= point[0] < 768 and 0 <= point[1] < 512:
            assert warped[int(point[1]), int(point[0])].max() > 100


def test_masks_derived_after_placement_line_up_with_warped_masks() -> None:
    people, size = demo_people("walking", "far")
    fitted = place_figure(ShotAssets(size, {"body": body_mask(people, size)}, people), (900, 600),
                          {"x": 0.6, "y": 0.9, "height": 0.6})
    assert fitted.people is not None
    derived = np.asarray(body_mask(fitted.people, fitted.size)) > 127
    warped = np.asarray(fitted.images["body"]) > 127
    assert (derived & warped).sum() / (derived | warped).sum() > 0.95


def test_without_placement_the_canvas_is_resized_to_the_background() -> None:
    people, size = demo_people("waving", "medium")
    pose = render_openpose(people, width=size[0], height=size[1])
    mask = body_mask(people, size)
    fitted = place_figure(ShotAssets(size, {"pose": pose, "body": mask}, people), (768, 640), None)
    for name, image in (("pose", pose), ("body", mask)):
        expected = image.resize((768, 640), Image.Resampling.BICUBIC)
        assert fitted.images[name].mode == image.mode
        assert fitted.images[name].tobytes() == expected.tobytes()
    assert fitted.scale == (1.5, 1.25) and fitted.offset == (0.0, 0.0)
    assert fitted.people is not None
    for before, after in zip(people[0], fitted.people[0], strict=True):
        if before is None:
            assert after is None
        else:
            assert after == pytest.approx((before[0] * 1.5, before[1] * 1.25, before[2]))


def test_the_demo_placement_reproduces_the_shot_on_its_own_canvas() -> None:
    """A shot's suggested placement is its framing; on a wider background it keeps the figure's
    proportions where resizing would stretch it."""
    for action in DEMO_ACTIONS:
        for shot in SHOTS:
            people, size = demo_people(action.name, shot)
            same = place_figure(ShotAssets(size, people=people), size, action.shots[shot].placement)
            assert same.scale[0] == pytest.approx(1, abs=0.01)
            # Feet cut off by the frame are estimated (from knees, hips or shoulders), so only
            # the far shots land within a pixel or so; a stride puts the knees off-centre.
            slack = (0.01 if shot == "far" else 0.03) * figure_of(people).height
            assert same.people is not None
            for before, after in zip(people[0], same.people[0], strict=True):
                if before is not None and after is not None:
                    assert math.dist(before[:2], after[:2]) < slack, (action.name, shot)

            wide = place_figure(ShotAssets(size, people=people), (2 * size[0], size[1]),
                                action.shots[shot].placement)
            assert wide.scale[0] == wide.scale[1] == pytest.approx(same.scale[0])


def test_images_only_shots_are_placed_by_their_figure() -> None:
    people, size = demo_people("standing", "far")
    mask = body_mask(people, size, feather_px=0)
    figure = figure_of_mask(mask)
    left, top, right, bottom = mask.getbbox() or (0, 0, 0, 0)
    assert figure == Figure(feet=((left + right) / 2, bottom), height=bottom - top)
    fitted = place_figure(ShotAssets(size, {"body": mask}, figure=figure), (640, 480),
                          Placement(x=0.5, y=1.0, height=0.5))
    assert fitted.people is None
    box = fitted.images["body"].point(lambda v: 255 if v >= 128 else 0).getbbox()
    assert box is not None
    assert box[3] == pytest.approx(480, abs=1)
    assert box[3] - box[1] == pytest.approx(240, abs=2)
    with pytest.raises(PreprocessError, match="keypoints or its figure"):
        place_figure(ShotAssets(size, {"body": mask}), (640, 480), Placement(x=0.5, y=1, height=0.5))


@pytest.mark.parametrize(("data", "message"), [
    ({"x": 0.5, "y": 0.5}, "needs height"),
    ({"x": 0.5, "y": 0.5, "height": 0.4, "scale": 2}, "unknown fields: scale"),
    ({"x": True, "y": 0.5, "height": 0.4}, "placement.x must be a finite number"),
    ({"x": 0.5, "y": 0.5, "height": 0}, "placement.height must be above 0"),
    ({"x": 0.5, "y": float("nan"), "height": 0.4}, "placement.y must be a finite number"),
])
def test_placement_is_checked(data: dict[str, object], message: str) -> None:
    with pytest.raises(PreprocessError, match=message):
        Placement.from_mapping(data)


def test_shot_images_must_match_the_canvas() -> None:
    with pytest.raises(PreprocessError, match="not the shot's 512x512 canvas"):
        place_figure(ShotAssets((512, 512), {"pose": Image.new("RGB", (256, 256))}), (768, 512))


def test_demo_actions_are_complete_openpose_files() -> None:
    assert len(DEMO_ACTIONS) >= 5
    assert {"standing", "waving", "walking", "sitting", "pointing"} <= set(ACTIONS)
    for action in DEMO_ACTIONS:
        assert len(action.description.split()) >= 6
        assert set(action.shots) == set(SHOTS)
        for shot in SHOTS:
            people, size = demo_people(action.name, shot)
            assert size == CANVAS_SIZE and len(people) == 1
            assert action.shots[shot].shot == shot and action.shots[shot].description
            Placement.from_mapping(action.shots[shot].placement)


def test_demo_places_draw_the_same_pixels_every_time() -> None:
    names = [image.name for place in DEMO_PLACES for image in place.images]
    assert len(DEMO_PLACES) >= 3 and len(names) == len(set(names))
    for place in DEMO_PLACES:
        assert place.description and place.images
        for image in place.images:
            first = image.render()
            assert first.mode == "RGB" and first.size == image.size and image.description
            assert first.tobytes() == image.render().tobytes()
            assert len(first.getcolors(1 << 16) or range(1 << 16)) > 20  # drawn, not a flat fill


def test_demo_modules_and_masks_import_without_heavy_packages() -> None:
    """The demo installer runs on the gateway, which has neither torch nor numpy."""
    code = ("import sys, services.gateway.scenes.demo_poses, services.gateway.scenes.demo_places, "
            "services.generator.scenes.masks; "
            "heavy = {'torch', 'numpy', 'cv2', 'scipy'} & set(sys.modules); "
            "sys.exit(', '.join(sorted(heavy)) or None)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert result.returncode == 0, result.stderr

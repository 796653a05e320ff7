"""A stored shot turned into what the body stage needs on a background: the control image and
both masks, all at the generation size and lined up with each other.

Keypoints are moved onto the background first and everything is drawn from them there (the
pose map's strokes and the masks' feathering then suit the background's size, as a ControlNet
expects); a mannequin image and given masks are warped by the same map.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from services.generator.poses import render_openpose
from services.generator.scenes import masks
from shared.errors import JobFailure
from shared.models import ControlType
from shared.poses import PreprocessError, parse_openpose_json
from shared.specs.scene import ShotAssets


@dataclass(frozen=True)
class FittedShot:
    pose: Image.Image  # RGB: a pose map, or the mannequin image for its preprocessor
    body_mask: Image.Image  # L, white repaints
    face_mask: Image.Image  # L
    control: ControlType
    preprocess: bool  # run the control's preprocessor on ``pose`` (a mannequin photo)


def fit_shot(assets: ShotAssets, images: dict[str, Image.Image],
             size: tuple[int, int]) -> FittedShot:
    """``images`` holds what the shot stored: ``pose`` (a mannequin or a ready pose map),
    ``body_mask`` and ``face_mask``, each optional, all on the shot's canvas."""
    try:
        return _fit(assets, images, size)
    except PreprocessError as exc:
        raise JobFailure(f"the action's shot cannot be fitted: {exc}",
                         code="invalid_shot") from exc


def _fit(assets: ShotAssets, images: dict[str, Image.Image], size: tuple[int, int]) -> FittedShot:
    people = None
    if assets.keypoints is not None:
        people, _, _ = parse_openpose_json(assets.keypoints, default_size=assets.canvas)
    canvas = dict(images)
    if "body_mask" in canvas:
        canvas["body_mask"] = canvas["body_mask"].convert("L")
    if "face_mask" in canvas:
        canvas["face_mask"] = canvas["face_mask"].convert("L")
    if "pose" in canvas:
        canvas["pose"] = canvas["pose"].convert("RGB")
    figure = None
    if people is None and assets.placement is not None and "body_mask" in canvas:
        figure = masks.figure_of_mask(canvas["body_mask"])
    fitted = masks.place_figure(
        masks.ShotAssets(canvas_size=assets.canvas, images=canvas, people=people, figure=figure),
        size, assets.placement)
    placed = fitted.people
    if placed is not None:
        pose = render_openpose(placed, width=size[0], height=size[1])
        body = fitted.images.get("body_mask") or masks.body_mask(placed, size)
        face = fitted.images.get("face_mask") or masks.face_mask(placed, size)
        return FittedShot(pose=pose, body_mask=body, face_mask=face,
                          control=ControlType.OPENPOSE, preprocess=False)
    if "pose" not in fitted.images or "body_mask" not in fitted.images \
            or "face_mask" not in fitted.images:
        raise PreprocessError("a shot without keypoints needs its pose image and both masks")
    control = ControlType(assets.control)
    return FittedShot(pose=fitted.images["pose"], body_mask=fitted.images["body_mask"],
                      face_mask=fitted.images["face_mask"], control=control,
                      preprocess=control != ControlType.OPENPOSE)

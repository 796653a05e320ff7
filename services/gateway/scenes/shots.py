"""An action's shots: every referenced upload checked, sized and copied before a row exists.

All of a request's shots are checked before anything is stored, and every problem is named by
its field (``shots.close.face_mask``), so a refused action leaves nothing behind. The images are
copied under the action's own keys: deleting an upload later never breaks an action.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.gateway.db.models import ActionShot
from services.gateway.images import CheckedImage, decode_image, mask_is_empty
from services.gateway.scenes.schemas import Placement, PoseIn, ShotIn, ShotOut
from shared.errors import NotFound, ValidationFailed
from shared.keys import action_asset_key, upload_key
from shared.models import ControlType
from shared.poses import NUM_KEYPOINTS, parse_openpose_json
from shared.specs.scene import Shot
from shared.storage import ObjectStore

UPLOAD_PREFIX = "upload:"


@dataclass
class PreparedShot:
    """One shot, checked: what its row will say and the PNGs to store for it."""

    shot: Shot
    pose_kind: str
    control: str
    canvas: tuple[int, int]
    keypoints: dict[str, Any] | None
    placement: dict[str, Any] | None
    pngs: dict[str, bytes] = field(default_factory=dict)  # asset name -> PNG bytes


def canonical_keypoints(pose: PoseIn) -> dict[str, Any]:
    """The keypoints as stored: one person, COCO-18, pixels, with the canvas, whichever of
    OpenPose's variants (BODY_25, 0..1 fractions, a separate canvas) was sent."""
    assert pose.keypoints is not None
    width, height = pose.keypoint_canvas()
    people, _, _ = parse_openpose_json(pose.keypoints, default_size=(width, height))
    flat: list[float] = []
    for point in people[0]:
        flat.extend((0.0, 0.0, 0.0) if point is None else (float(point[0]), float(point[1]),
                                                           float(point[2])))
    assert len(flat) == 3 * NUM_KEYPOINTS
    return {"people": [{"pose_keypoints_2d": flat}], "canvas_width": width,
            "canvas_height": height}


async def _load_upload(*, store: ObjectStore, tenant_id: str, ref: str, field_name: str,
                       mode: str) -> CheckedImage:
    """An upload of this tenant's, decoded again (it was checked once; the size and the mask's
    content are what matter here). Another tenant's id finds nothing, as an unknown one."""
    upload_id = ref.removeprefix(UPLOAD_PREFIX)
    try:
        data = await store.get(upload_key(tenant_id, upload_id))
    except NotFound as exc:
        raise ValidationFailed([{"field": field_name, "message": f"no upload {upload_id!r} "
                                 "(upload images with POST /v1/uploads)"}]) from exc
    return await asyncio.to_thread(decode_image, data, field=field_name, mode=mode)


async def _prepare_one(*, store: ObjectStore, tenant_id: str, shot: Shot, spec: ShotIn,
                       errors: list[dict[str, Any]]) -> PreparedShot | None:
    base = f"shots.{shot.value}"
    pose = spec.pose
    pngs: dict[str, bytes] = {}
    if pose.image is not None:
        try:
            image = await _load_upload(store=store, tenant_id=tenant_id, ref=pose.image,
                                       field_name=f"{base}.pose.image", mode="RGB")
        except ValidationFailed as exc:
            errors.extend(exc.errors)
            return None
        pngs["pose_image"] = image.png
        canvas, what = image.size, "the pose image"
        prepared = PreparedShot(shot=shot, pose_kind="image", control=str(pose.control),
                                canvas=canvas, keypoints=None, placement=None)
    else:
        canvas, what = pose.keypoint_canvas(), "the keypoints' canvas"
        prepared = PreparedShot(shot=shot, pose_kind="keypoints",
                                control=ControlType.OPENPOSE.value, canvas=canvas,
                                keypoints=canonical_keypoints(pose), placement=None)
    ok = True
    for name in ("body_mask", "face_mask"):
        ref = getattr(spec, name)
        if ref is None:
            continue
        field_name = f"{base}.{name}"
        try:
            mask = await _load_upload(store=store, tenant_id=tenant_id, ref=ref,
                                      field_name=field_name, mode="L")
        except ValidationFailed as exc:
            errors.extend(exc.errors)
            ok = False
            continue
        if mask.size != canvas:
            errors.append({"field": field_name, "message": f"the mask is {mask.size[0]}x"
                           f"{mask.size[1]} but {what} is {canvas[0]}x{canvas[1]}; a shot's "
                           "masks have its pose guide's size"})
            ok = False
        elif mask_is_empty(mask.image):
            errors.append({"field": field_name, "message": "the mask is empty (all black): "
                           "white marks where it applies"})
            ok = False
        else:
            pngs[name] = mask.png
    if not ok:
        return None
    prepared.pngs = pngs
    prepared.placement = spec.placement.model_dump() if spec.placement is not None else None
    return prepared


async def prepare_shots(*, store: ObjectStore, tenant_id: str,
                        shots: dict[Shot, ShotIn]) -> list[PreparedShot]:
    """Check every shot; one 422 naming every bad field, or the shots ready to store."""
    errors: list[dict[str, Any]] = []
    prepared = []
    for shot in Shot:  # a stable order, so errors read the same every time
        if shot in shots:
            one = await _prepare_one(store=store, tenant_id=tenant_id, shot=shot,
                                     spec=shots[shot], errors=errors)
            if one is not None:
                prepared.append(one)
    if errors:
        raise ValidationFailed(errors)
    return prepared


async def store_shot(*, store: ObjectStore, tenant_id: str, action_id: str,
                     prepared: PreparedShot, written: list[str]) -> dict[str, str]:
    """Put a shot's PNGs under new keys of the action; each key is added to ``written`` as it
    is stored, so a caller that fails later can remove exactly these."""
    keys: dict[str, str] = {}
    for name, png in prepared.pngs.items():
        key = action_asset_key(tenant_id, action_id,
                               f"{prepared.shot.value}-{name}-{uuid.uuid4().hex[:16]}")
        await store.put(key, png, content_type="image/png")
        written.append(key)
        keys[name] = key
    return keys


def apply_shot(row: ActionShot, prepared: PreparedShot, keys: dict[str, str]) -> None:
    """Make ``row`` say what ``prepared`` does (a new row, or one being replaced in place)."""
    row.shot = prepared.shot.value
    row.pose_kind = prepared.pose_kind
    row.control = prepared.control
    row.keypoints = prepared.keypoints
    row.canvas_width, row.canvas_height = prepared.canvas
    row.pose_image_key = keys.get("pose_image")
    row.body_mask_key = keys.get("body_mask")
    row.face_mask_key = keys.get("face_mask")
    row.placement = prepared.placement


def shot_keys(row: ActionShot) -> list[str]:
    """The stored objects a shot row names."""
    return [key for key in (row.pose_image_key, row.body_mask_key, row.face_mask_key) if key]


def shot_out(row: ActionShot, *, presign: Callable[[str], str]) -> ShotOut:
    def url(key: str | None) -> str | None:
        return presign(key) if key else None

    return ShotOut(
        pose_kind="image" if row.pose_kind == "image" else "keypoints",
        control=ControlType(row.control), keypoints=row.keypoints,
        canvas=(row.canvas_width, row.canvas_height), pose_image_url=url(row.pose_image_key),
        body_mask_url=url(row.body_mask_key), face_mask_url=url(row.face_mask_key),
        placement=Placement.model_validate(row.placement) if row.placement else None,
    )

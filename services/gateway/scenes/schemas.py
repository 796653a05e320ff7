"""What the scenes catalog takes and returns: places, their background images, actions."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from shared.models import ControlType
from shared.poses import PreprocessError, parse_openpose_json
from shared.specs.generation import EXAMPLE_POSE
from shared.specs.scene import SHOT_ALIASES, Shot, shot_of
from shared.text import MULTILINE, RequestModel

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _not_an_id(name: str) -> str:
    """Places, images and actions are named by id or by name wherever a scene refers to them;
    a name shaped like an id could point at another item."""
    if _UUID.fullmatch(name):
        raise ValueError("a name may not have the form of an id (a UUID)")
    return name


CatalogName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
    AfterValidator(_not_an_id),
]
Description = Annotated[str, MULTILINE, Field(max_length=2000)]
UploadRef = Annotated[str, Field(
    pattern=r"^upload:[0-9a-f]{32}$", examples=["upload:3f2a9c0d1e7b4a563f2a9c0d1e7b4a56"],
    description="An image from `POST /v1/uploads`, as `upload:<id>`; it is copied into the "
                "action, so deleting the upload later changes nothing.")]
CanvasSide = Annotated[int, Field(ge=8, le=8192)]


def field_error(model: str, loc: tuple[str, ...], message: str) -> ValidationError:
    """A validation error at ``loc`` inside the model, so a cross-field rule names the very
    field it is about (``shots.close.pose.canvas``), not the object holding it."""
    return ValidationError.from_exception_data(model, [InitErrorDetails(
        type=PydanticCustomError("value_error", "{message}", {"message": message}),
        loc=loc, input=None)])


def _refuse_explicit_nulls(model: BaseModel, *names: str) -> None:
    """In a PATCH, a field left out is unchanged; one sent as null would mean "no name"."""
    for name in names:
        if name in model.model_fields_set and getattr(model, name) is None:
            raise field_error(type(model).__name__, (name,), "may be left out, not null")


# ---------------------------------------------------------------------------------------------
# Places


class PlaceIn(RequestModel):
    """A point of interest: a name unique among the tenant's places and a description."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "harbour", "description": "a small fishing harbour at dusk"}]})

    name: CatalogName = Field(description="Unique among your places; scenes may name it.")
    description: Description = Field(default="", description="What the place is.")


class PlacePatch(RequestModel):
    """Fields left out are unchanged."""

    model_config = ConfigDict(extra="forbid")

    name: CatalogName | None = Field(default=None, description="A new unique name.")
    description: Description | None = Field(default=None, description="A new description.")

    @model_validator(mode="after")
    def _no_nulls(self) -> PlacePatch:
        _refuse_explicit_nulls(self, "name", "description")
        return self


class PlaceOut(BaseModel):
    id: str = Field(description="The place's id.")
    name: str = Field(description="Its name, unique among your places.")
    description: str = Field(description="What the place is.")
    created_at: datetime = Field(description="When it was created (RFC 3339, UTC).")
    updated_at: datetime = Field(description="When it was last changed (RFC 3339, UTC).")
    links: dict[str, str] = Field(description="Related URLs: `self` and `images`.")


class PlacePage(BaseModel):
    items: list[PlaceOut] = Field(description="Your places, newest first.")
    next_cursor: str | None = Field(description="Pass as ?cursor= to get the next page; null on "
                                    "the last.")


class PlaceImageFields(RequestModel):
    """The text fields of a background upload; the picture travels beside them as `image`."""

    model_config = ConfigDict(extra="ignore")

    name: CatalogName = Field(description="Unique among this place's images; scenes may name it.")
    description: Description = Field(default="", description="What the picture shows; a scene "
                                     "puts it into its prompt.")


class PlaceImagePatch(PlacePatch):
    """Fields left out are unchanged; the picture itself is replaced by uploading a new one."""


class PlaceImageOut(BaseModel):
    id: str = Field(description="The image's id.")
    place_id: str = Field(description="The place it belongs to.")
    name: str = Field(description="Its name, unique within the place.")
    description: str = Field(description="What the picture shows.")
    width: int = Field(description="Width in pixels.")
    height: int = Field(description="Height in pixels.")
    content_type: str = Field(description="How it is stored: `image/png` (the checked image, "
                              "EXIF orientation applied).")
    size: int = Field(description="Stored size in bytes.")
    sha256: str = Field(description="SHA-256 of the stored bytes, hex.")
    url: str = Field(description="Presigned URL of the image.")
    thumbnail_url: str = Field(description="Presigned URL of a small JPEG preview.")
    created_at: datetime = Field(description="When it was uploaded (RFC 3339, UTC).")
    updated_at: datetime = Field(description="When it was last changed (RFC 3339, UTC).")


class PlaceImagePage(BaseModel):
    items: list[PlaceImageOut] = Field(description="The place's images, newest first.")
    next_cursor: str | None = Field(description="Pass as ?cursor= to get the next page; null on "
                                    "the last.")


# ---------------------------------------------------------------------------------------------
# Actions


class PoseIn(RequestModel):
    """The pose guide of a shot: OpenPose keypoints, or a mannequin image with its ControlNet.

    Keypoints need a canvas: the JSON's own `canvas_width`/`canvas_height` (what pose editors
    write), or `canvas: [width, height]` beside it; the masks must have that size. They are
    stored as read: one person, COCO-18 order, pixel coordinates, with the canvas.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"keypoints": {"people": [{"pose_keypoints_2d": EXAMPLE_POSE}]}, "canvas": [512, 512]},
        {"image": "upload:3f2a9c0d1e7b4a563f2a9c0d1e7b4a56", "control": "depth"}]})

    keypoints: dict[str, Any] | None = Field(
        default=None, description="OpenPose JSON with one person (`people[0].pose_keypoints_2d`, "
        "COCO-18 or BODY_25, pixels or 0..1 fractions of the canvas).")
    canvas: tuple[CanvasSide, CanvasSide] | None = Field(
        default=None, description="`[width, height]` of the keypoints' canvas, when their JSON "
        "has no `canvas_width`/`canvas_height`.")
    image: UploadRef | None = Field(default=None, description="A mannequin image (or a ready "
                                    "pose map with `control: openpose`).")
    control: ControlType | None = Field(
        default=None, description="The ControlNet that reads `image`: depth, canny, scribble, or "
        "openpose for a ready pose map. Keypoints are always openpose.")

    @field_validator("keypoints")
    @classmethod
    def _one_readable_person(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        try:
            people, _, _ = parse_openpose_json(value, default_size=(512, 512))
        except PreprocessError as exc:
            raise ValueError(str(exc)) from exc
        if len(people) != 1:
            raise ValueError(f"an action poses one figure; the keypoints hold {len(people)} people")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> PoseIn:
        name = type(self).__name__
        if (self.keypoints is None) == (self.image is None):
            raise ValueError("give `keypoints` or `image`, one of them")
        if self.image is not None:
            if self.control is None:
                raise field_error(name, ("control",), "say which ControlNet reads the image: "
                                  "depth, canny, scribble or openpose")
            if self.canvas is not None:
                raise field_error(name, ("canvas",), "an image is its own canvas; `canvas` is "
                                  "for keypoints")
            return self
        if self.control not in (None, ControlType.OPENPOSE):
            raise field_error(name, ("control",), "keypoints are drawn for the openpose "
                              "ControlNet; leave `control` out or make it openpose")
        own = self._json_canvas()
        if own is None and self.canvas is None:
            raise field_error(name, ("canvas",), "the keypoints name no canvas_width/"
                              "canvas_height: give `canvas: [width, height]`")
        if own is not None and self.canvas is not None and tuple(self.canvas) != own:
            raise field_error(name, ("canvas",), f"{list(self.canvas)} differs from the "
                              f"keypoints' own canvas {list(own)}")
        return self

    def _json_canvas(self) -> tuple[int, int] | None:
        if self.keypoints is None or not ({"canvas_width", "canvas_height"} & set(self.keypoints)):
            return None
        _, width, height = parse_openpose_json(self.keypoints)
        return width, height

    def keypoint_canvas(self) -> tuple[int, int]:
        """The canvas the keypoints are drawn on (checked above to be known)."""
        own = self._json_canvas()
        if own is not None:
            return own
        assert self.canvas is not None  # _one_source refuses keypoints without a canvas
        return self.canvas[0], self.canvas[1]


class Placement(RequestModel):
    """Where the figure goes in a background of any size, as fractions of it (the generator's
    ``place_figure``). A figure may reach past the edges, so the bounds only keep numbers sane."""

    model_config = ConfigDict(extra="forbid")

    x: float = Field(ge=-10, le=10, description="Where the feet are (between the ankles), "
                     "across the background: 0 left, 1 right.")
    y: float = Field(ge=-10, le=10, description="Where the feet stand, down the background: 0 "
                     "top, 1 bottom; a close shot's feet lie below it (more than 1).")
    height: float = Field(gt=0, le=10, description="The figure's standing height as a fraction "
                          "of the background's height; a close shot's figure is taller than "
                          "the background (more than 1).")


class ShotIn(RequestModel):
    """One shot of an action. Masks are white where the person (body) or the face goes, and
    have the pose image's size (or the keypoints' canvas)."""

    model_config = ConfigDict(extra="forbid")

    pose: PoseIn = Field(description="The pose guide.")
    body_mask: UploadRef | None = Field(default=None, description="Where the person is "
                                        "painted in.")
    face_mask: UploadRef | None = Field(default=None, description="Where the face is painted in.")
    placement: Placement | None = Field(default=None, description="Where and how large the "
                                        "figure goes; default: the shot fitted to the background.")


def _canonical_shot_keys(value: object) -> object:
    """Accept CLS/MES/FUS (any case) as keys, as a scene's `shot` does; an unknown key is left
    for the enum to name."""
    if not isinstance(value, dict):
        return value
    out: dict[object, object] = {}
    for key, item in value.items():
        shot = shot_of(key)
        if shot in out:
            raise ValueError(f"shot {shot!s} is given twice (as {key!r} and another name)")
        out[shot] = item
    return out


# A shot as a key a client may send: documented with its aliases (the enum alone would call
# CLS invalid), read as a Shot once _canonical_shot_keys has mapped them.
ShotKey = Annotated[Shot, WithJsonSchema({"type": "string", "enum": [
    *(s.value for s in Shot), *SHOT_ALIASES]})]
_SHOTS_DESCRIPTION = ("Per shot (`close`, `medium`, `far`; `CLS`, `MES`, `FUS` are accepted): "
                      "the pose guide, masks and placement.")


class ActionIn(RequestModel):
    """An action and how it looks from each shot (at least one)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "name": "standing", "description": "standing upright, arms relaxed",
        "shots": {"medium": {"pose": {"keypoints": {"people": [
            {"pose_keypoints_2d": EXAMPLE_POSE}]}, "canvas": [512, 512]}}}}]})

    name: CatalogName = Field(description="Unique among your actions; scenes may name it.")
    description: Description = Field(default="", description="What the person does; a scene "
                                     "puts it into its prompt, and action matching reads it.")
    shots: dict[ShotKey, ShotIn] = Field(min_length=1, description=_SHOTS_DESCRIPTION)

    _shot_keys = field_validator("shots", mode="before")(_canonical_shot_keys)


class ActionPatch(RequestModel):
    """Fields left out are unchanged; a shot given replaces that shot, `null` removes it (an
    action keeps at least one)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"description": "waving hello with the right hand"}, {"shots": {"far": None}}]})

    name: CatalogName | None = Field(default=None, description="A new unique name.")
    description: Description | None = Field(default=None, description="A new description.")
    shots: dict[ShotKey, ShotIn | None] | None = Field(
        default=None, description="Shots to replace (or remove, as null); keys as in "
        "`ActionIn.shots`.")

    _shot_keys = field_validator("shots", mode="before")(_canonical_shot_keys)

    @model_validator(mode="after")
    def _no_nulls(self) -> ActionPatch:
        _refuse_explicit_nulls(self, "name", "description", "shots")
        return self


class ShotOut(BaseModel):
    pose_kind: Literal["keypoints", "image"] = Field(description="What guides the pose.")
    control: ControlType = Field(description="The ControlNet the pose guide is for.")
    keypoints: dict[str, Any] | None = Field(
        default=None, description="keypoints only: OpenPose JSON, one person, COCO-18, pixel "
        "coordinates, with `canvas_width`/`canvas_height`.")
    canvas: tuple[int, int] = Field(description="`[width, height]` of the pose guide; the masks "
                                    "have this size.")
    pose_image_url: str | None = Field(default=None, description="image only: presigned URL "
                                       "of the mannequin image.")
    body_mask_url: str | None = Field(default=None, description="Presigned URL of the body "
                                      "mask; null when none was given.")
    face_mask_url: str | None = Field(default=None, description="Presigned URL of the face "
                                      "mask; null when none was given.")
    placement: Placement | None = Field(default=None, description="Where the figure goes; null: "
                                        "fitted to the background.")


class ActionOut(BaseModel):
    id: str = Field(description="The action's id.")
    name: str = Field(description="Its name, unique among your actions.")
    description: str = Field(description="What the person does.")
    shots: dict[Shot, ShotOut] = Field(description="The shots it has, by `close`, `medium`, "
                                       "`far`.")
    created_at: datetime = Field(description="When it was created (RFC 3339, UTC).")
    updated_at: datetime = Field(description="When it was last changed (RFC 3339, UTC).")


class ActionPage(BaseModel):
    items: list[ActionOut] = Field(description="Your actions, newest first.")
    next_cursor: str | None = Field(description="Pass as ?cursor= to get the next page; null on "
                                    "the last.")

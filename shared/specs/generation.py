"""Generation specs: the API request body, the queued payload and the stored manifest are one model.

Structural rules (types, ranges, multiples of 8) live on the model so every layer checks
them the same way; rules that need the model registry live in the gateway's
``services.gateway.generations.resolve``, which runs before queueing and fills the
server-chosen fields. Control-image previews (:class:`PreprocessSpec`) live here too: they
share the ControlNet input rules.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from shared.models import ControlType
from shared.poses import parse_openpose_json
from shared.specs.common import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    JobWebhook,
    LoraRef,
    SafetyPolicy,
    Size,
)
from shared.text import MULTILINE, RequestModel

# A standing figure, COCO-18 keypoints normalised to the canvas (x, y, confidence).
EXAMPLE_POSE: list[Any] = [0.5, 0.16, 1, 0.5, 0.28, 1, 0.41, 0.28, 1, 0.38, 0.44, 1, 0.36, 0.58, 1,
                0.59, 0.28, 1, 0.62, 0.44, 1, 0.64, 0.58, 1, 0.44, 0.58, 1, 0.43, 0.76, 1,
                0.42, 0.94, 1, 0.56, 0.58, 1, 0.57, 0.76, 1, 0.58, 0.94, 1, 0.48, 0.14, 1,
                0.52, 0.14, 1, 0.46, 0.15, 1, 0.54, 0.15, 1]


class GenerationMode(StrEnum):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    OUTPAINT = "outpaint"


ImageRef = Annotated[
    str,
    Field(
        min_length=3,
        max_length=48 * 1024 * 1024,
        description="An image: `upload:<id>` (from `POST /v1/uploads`), `job:<job_id>/<index>` "
        "(an earlier job's output), or a `data:image/png;base64,...` URL.",
        examples=["upload:3f2a9c0d1e7b4a56", "job:6d1f0c3e-8a4b-4d2e-9f0a-1b2c3d4e5f60/0"],
    ),
]


class _Shape(RequestModel):
    model_config = ConfigDict(extra="forbid")
    value: float = Field(default=1.0, ge=0, le=1,
                         description="1 repaints fully; greys repaint partially.")


class RectShape(_Shape):
    type: Literal["rect"] = Field(description="Shape kind.")
    x: float = Field(description="Left edge, px of the init image.")
    y: float = Field(description="Top edge, px of the init image.")
    width: float = Field(gt=0, description="Width in px.")
    height: float = Field(gt=0, description="Height in px.")


class CircleShape(_Shape):
    type: Literal["circle"] = Field(description="Shape kind.")
    cx: float = Field(description="Centre x, px of the init image.")
    cy: float = Field(description="Centre y, px of the init image.")
    r: float = Field(gt=0, description="Radius in px.")


class EllipseShape(_Shape):
    type: Literal["ellipse"] = Field(description="Shape kind.")
    cx: float = Field(description="Centre x, px of the init image.")
    cy: float = Field(description="Centre y, px of the init image.")
    rx: float = Field(gt=0, description="Horizontal radius in px.")
    ry: float = Field(gt=0, description="Vertical radius in px.")


class PolygonShape(_Shape):
    type: Literal["polygon"] = Field(description="Shape kind.")
    points: list[tuple[float, float]] = Field(min_length=3, max_length=256, description="Vertices as [x, "
                                              "y] pairs in px of the init image, 3 to 256 of them.")


MaskShape = Annotated[RectShape | CircleShape | EllipseShape | PolygonShape,
                      Field(discriminator="type")]


class MaskSpec(RequestModel):
    """White repaints, black keeps. Pixel coordinates are those of the init image."""

    model_config = ConfigDict(extra="forbid")

    image: ImageRef | None = Field(default=None, description="A mask image (white repaints, black keeps, "
                                   "greys partly), the init image's aspect ratio.")
    shapes: list[MaskShape] | None = Field(default=None, min_length=1, max_length=64,
                                           description="Shapes painted white on black, 1-64 of them.")
    feather: float = Field(default=0, ge=0, le=256, description="Blur radius of the edges, px.")
    invert: bool = Field(default=False, description="Swap what is repainted and what is kept.")

    @model_validator(mode="after")
    def _one_source(self) -> MaskSpec:
        if (self.image is None) == (self.shapes is None):
            raise ValueError("give the mask as exactly one of `image` or `shapes`")
        return self


PadPixels = Annotated[int, Field(default=0, ge=0, le=2048, multiple_of=8)]


class OutpaintSpec(RequestModel):
    """Pixels to add on each side; the new area is generated to continue the image."""

    model_config = ConfigDict(extra="forbid")

    left: PadPixels = Field(default=0, description="Pixels to add on the left, a multiple of 8.")
    right: PadPixels = Field(default=0, description="Pixels to add on the right, a multiple of 8.")
    top: PadPixels = Field(default=0, description="Pixels to add at the top, a multiple of 8.")
    bottom: PadPixels = Field(default=0, description="Pixels to add at the bottom, a multiple of 8.")
    feather: float = Field(default=8, ge=0, le=128, description="Blur radius in px of the seam between the "
                           "image and the new area.")

    @model_validator(mode="after")
    def _extends(self) -> OutpaintSpec:
        if not (self.left or self.right or self.top or self.bottom):
            raise ValueError("extend at least one side by a positive number of pixels")
        return self


def _check_control_source(kind: ControlType, *, image: str | None,
                          keypoints: dict[str, Any] | None, low: int, high: int) -> None:
    """One set of rules for a control's input, in generations and in previews alike."""
    if keypoints is not None and kind != ControlType.OPENPOSE:
        raise ValueError("keypoints are only for type 'openpose'")
    if (image is None) == (keypoints is None):
        raise ValueError("give exactly one of `image` or `keypoints` (openpose)")
    if kind == ControlType.CANNY and low > high:
        raise ValueError("low_threshold must not exceed high_threshold")
    if keypoints is not None:
        parse_openpose_json(keypoints, default_size=(512, 512))  # raises a ValueError


class ControlSpec(RequestModel):
    """One ControlNet: its conditioning image, strength and the part of the schedule it acts on."""

    model_config = ConfigDict(extra="forbid")

    type: ControlType = Field(description="The ControlNet: canny, depth, openpose or scribble.")
    image: ImageRef | None = Field(
        default=None, description="A photo to preprocess, or a ready control image with "
        "`preprocess: false`.")
    keypoints: dict[str, Any] | None = Field(
        default=None, description="openpose only: OpenPose JSON (`people[].pose_keypoints_2d`, "
        "COCO 18 points), drawn into the control image.")
    preprocess: bool = Field(default=True, description="Run the type's preprocessor on `image`.")
    scale: float = Field(default=1.0, ge=0, le=2, description="controlnet_conditioning_scale")
    start: float = Field(default=0.0, ge=0, le=1, description="Fraction of steps where it starts.")
    end: float = Field(default=1.0, ge=0, le=1, description="Fraction of steps where it stops.")
    low_threshold: int = Field(default=100, ge=0, le=255, description="canny only")
    high_threshold: int = Field(default=200, ge=0, le=255, description="canny only")

    @model_validator(mode="after")
    def _consistent(self) -> ControlSpec:
        if self.start > self.end:
            raise ValueError(f"start ({self.start}) must not be after end ({self.end})")
        _check_control_source(self.type, image=self.image, keypoints=self.keypoints,
                              low=self.low_threshold, high=self.high_threshold)
        return self


class PreprocessSpec(RequestModel):
    """Ask for a control image without generating, to look at what a ControlNet will see."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"type": "canny", "image": "upload:3f2a9c0d1e7b4a56", "low_threshold": 50,
             "high_threshold": 150},
            {"type": "openpose", "width": 512, "height": 512, "keypoints": {"people": [
                {"pose_keypoints_2d": [256, 100, 1, 256, 160, 1, 210, 160, 1, 190, 240, 1,
                                       180, 310, 1, 302, 160, 1, 322, 240, 1, 332, 310, 1,
                                       226, 300, 1, 220, 400, 1, 216, 490, 1, 286, 300, 1,
                                       292, 400, 1, 296, 490, 1, 246, 90, 1, 266, 90, 1,
                                       236, 96, 1, 276, 96, 1]}]}},
        ]},
    )

    type: ControlType = Field(description="Which ControlNet's preprocessor to run: canny, depth, openpose "
                              "or scribble.")
    image: ImageRef | None = Field(default=None, description="The photo to preprocess.")
    keypoints: dict[str, Any] | None = Field(default=None, description="openpose only: OpenPose JSON "
                                             "(`people[].pose_keypoints_2d`, COCO 18 points) to draw.")
    low_threshold: int = Field(default=100, ge=0, le=255, description="canny only: lower hysteresis "
                               "threshold.")
    high_threshold: int = Field(default=200, ge=0, le=255, description="canny only: upper hysteresis "
                                "threshold.")
    width: Size | None = Field(default=None, description="Default: the image's (or keypoint "
                               "canvas') size.")
    height: Size | None = Field(default=None, description="Default: the image's (or keypoint canvas') "
                                "height.")

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessSpec:
        _check_control_source(self.type, image=self.image, keypoints=self.keypoints,
                              low=self.low_threshold, high=self.high_threshold)
        return self


class PreprocessTask(BaseModel):
    tenant_id: str
    spec: PreprocessSpec
    input_key: str | None = None
    width: int
    height: int


class LoraUse(RequestModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64, description="A LoRA id from `POST /v1/loras`.")
    weight: float = Field(default=1.0, ge=-4, le=4, description="Strength, -4 to 4; 0 gives the base "
                          "model's pixels exactly.")


class GenerationSpec(RequestModel):
    """A generation request. Fields left out are filled from the model's family defaults.

    ``mode`` picks what the inputs mean: txt2img needs only a prompt; img2img an
    ``init_image`` and ``strength``; inpaint an ``init_image`` and a ``mask``; outpaint an
    ``init_image`` and the pixels to add. ``controls`` and ``loras`` combine with any mode.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "a red fox in snow, golden hour", "model": "tiny-sd15", "steps": 4,
                 "seed": 42},
                {"prompt": "a lighthouse at dusk, (oil painting:1.3)", "negative_prompt": "blurry",
                 "model": "sd15", "width": 512, "height": 768, "steps": 30,
                 "guidance_scale": 7.0, "scheduler": "DPM++ 2M Karras", "num_images": 2},
                {"mode": "img2img", "prompt": "the same scene in winter",
                 "init_image": "upload:3f2a9c0d1e7b4a56", "strength": 0.6},
                {"mode": "inpaint", "prompt": "a wooden door", "init_image": "upload:3f2a9c0d1e7b4a56",
                 "mask": {"shapes": [{"type": "rect", "x": 16, "y": 8, "width": 32, "height": 48}],
                          "feather": 4}},
                {"mode": "outpaint", "prompt": "a wide beach", "init_image": "upload:3f2a9c0d1e7b4a56",
                 "outpaint": {"left": 64, "right": 64}},
                {"prompt": "a dancer on a stage", "controls": [
                    {"type": "canny", "image": "upload:3f2a9c0d1e7b4a56", "scale": 0.8,
                     "low_threshold": 80, "high_threshold": 180},
                    {"type": "openpose", "keypoints": {"people": [{"pose_keypoints_2d": EXAMPLE_POSE}]},
                     "scale": 1.0, "start": 0.0, "end": 0.6}],
                 "loras": [{"id": "8c1d2e3f4a5b6c7d", "weight": 0.8}]},
            ]
        },
    )

    mode: GenerationMode = Field(default=GenerationMode.TXT2IMG, description="txt2img, img2img, inpaint or "
                                 "outpaint: which inputs the job uses.")
    prompt: Annotated[str, MULTILINE] = Field(
        max_length=MAX_PROMPT_CHARS, description="What to draw, up to 2000 characters; empty "
        "only with an init image (img2img, inpaint, outpaint: the image alone guides). webui "
        "weighting `(word:1.3)`, `(word)`, `[word]` and `BREAK` work; longer than 77 tokens "
        "is chunked (SD1.5/SDXL).", examples=["a red fox in snow, golden hour"])
    negative_prompt: Annotated[str, MULTILINE] = Field(default="", max_length=MAX_PROMPT_CHARS,
                                                       description="What to steer away from (same syntax "
                                                       "as prompt).")
    model: str | None = Field(
        default=None, max_length=100, description="Preset name; default from settings."
    )
    width: Size | None = Field(default=None, description="Default: the preset's size, or the "
                               "init image's for img2img/inpaint.")
    height: Size | None = Field(default=None, description="Default: the preset's size, or the init image's "
                                "for img2img/inpaint.")
    steps: int | None = Field(default=None, ge=1, le=500, description="Denoising steps.")
    guidance_scale: float | None = Field(default=None, ge=0, le=50, description="Classifier-free guidance: "
                                         "how strongly the prompt is followed. Default: the preset's.")
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED,
        description="Image i uses seed + i. Drawn at random and recorded when absent.",
    )
    num_images: int = Field(default=1, ge=1, le=8, description="Images to make, 1-8; image i uses seed + i.")
    scheduler: str | None = Field(
        default=None, description="e.g. 'Euler a', 'DPM++ 2M Karras', 'DDIM'. Default: model's."
    )
    eta: float | None = Field(
        default=None, ge=0, le=1,
        description="DDIM's η: 0 (the default) is deterministic DDIM, 1 adds as much fresh "
        "noise each step as DDPM. Only with scheduler 'DDIM' (the other schedulers have no "
        "such knob), so any other scheduler is a 422 naming eta.")
    init_image: ImageRef | None = Field(default=None, description="img2img/inpaint/outpaint: the image to "
                                        "start from.")
    strength: float | None = Field(
        default=None, ge=0, le=1,
        description="How much of the init image is redrawn: 0 keeps it, 1 ignores it. "
        "Default 0.75 for img2img, 1.0 for inpaint/outpaint.",
    )
    mask: MaskSpec | None = Field(default=None, description="inpaint: what to repaint, as an image or "
                                  "shapes.")
    outpaint: OutpaintSpec | None = Field(default=None, description="outpaint: pixels to add on each side.")
    composite: bool = Field(
        default=True, description="inpaint/outpaint: paste the original pixels back where the "
        "mask is black, so unmasked areas are exactly the input.")
    controls: list[ControlSpec] = Field(default_factory=list, max_length=4, description="ControlNets "
                                        "applied in any mode, up to 4.")
    loras: list[LoraUse] = Field(default_factory=list, max_length=5, description="Uploaded or trained "
                                 "LoRAs (or subjects, by id) to apply with their weights, up to 5.")
    subject: str | None = Field(default=None, min_length=1, max_length=64, description="A ready "
                                "subject's id: its LoRA at weight 1, its trigger words first in "
                                "the prompt.")
    webhook: JobWebhook = None

    @model_validator(mode="after")
    def _mode_inputs(self) -> GenerationSpec:
        # Raised as a ValidationError so each error is reported at its field (`init_image`),
        # not at the whole body as a validator's ValueError would be.
        errors: list[InitErrorDetails] = []

        def refuse(loc: tuple[str | int, ...], message: str, value: Any) -> None:
            errors.append(InitErrorDetails(type=PydanticCustomError(
                "value_error", "{reason}", {"reason": message}), loc=loc, input=value))

        if self.mode == GenerationMode.TXT2IMG and not self.prompt.strip():
            refuse(("prompt",), "must not be empty or only whitespace (only a mode with an "
                   "init image may leave it empty)", self.prompt)
        needs = {
            GenerationMode.TXT2IMG: set(),
            GenerationMode.IMG2IMG: {"init_image"},
            GenerationMode.INPAINT: {"init_image", "mask"},
            GenerationMode.OUTPAINT: {"init_image", "outpaint"},
        }[self.mode]
        for name in ("init_image", "mask", "outpaint"):
            value = getattr(self, name)
            if name in needs and value is None:
                refuse((name,), f"mode {self.mode.value!r} needs `{name}`", value)
            if name not in needs and value is not None:
                refuse((name,), f"`{name}` is not used by mode {self.mode.value!r}", value)
        if self.strength is not None and self.mode == GenerationMode.TXT2IMG:
            refuse(("strength",), "`strength` applies to img2img, inpaint and outpaint",
                   self.strength)
        seen: set[str] = set()
        for index, lora in enumerate(self.loras):
            if lora.id in seen:
                refuse(("loras", index, "id"), "each LoRA may appear once in `loras`", lora.id)
            seen.add(lora.id)
        if errors:
            raise PydanticValidationError.from_exception_data(type(self).__name__, errors)
        return self

    def is_resolved(self) -> bool:
        return None not in (self.model, self.width, self.height, self.steps, self.guidance_scale,
                            self.seed)


class GenerationTask(BaseModel):
    """What the gateway queues for the generator: a resolved spec and where it belongs.

    ``inputs`` maps a spec field path (``init_image``, ``mask``, ``controls.0.image``) to the
    storage key of the checked PNG the gateway stored for it, so the worker reads bytes
    that were already validated and never resolves client references itself.
    """

    job_id: str
    tenant_id: str
    spec: GenerationSpec
    inputs: dict[str, str] = Field(default_factory=dict)
    loras: list[LoraRef] = Field(default_factory=list)
    safety: SafetyPolicy | None = None

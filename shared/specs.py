"""Job specs: the API request body, the queued payload and the stored manifest are one model.

Structural rules (types, ranges, multiples of 8) live on the model so every layer checks
them the same way; rules that need the model registry live in :func:`resolve_generation`,
which the gateway runs before queueing and which fills the server-chosen fields.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from shared.errors import ValidationFailed
from shared.models import ControlType, ModelRegistry, canonical_scheduler
from shared.poses import parse_openpose_json
from shared.text import MULTILINE, RequestModel

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1


class JobKind(StrEnum):
    GENERATION = "generation"
    SWEEP = "sweep"
    TRAINING = "training"
    TAGGING = "tagging"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


Prompt = Annotated[
    str,
    Field(min_length=1, max_length=MAX_PROMPT_CHARS, examples=["a red fox in snow, golden hour"]),
    AfterValidator(_not_blank),
    MULTILINE,
]
Size = Annotated[int, Field(ge=64, le=4096, multiple_of=8, description="Pixels, multiple of 8.")]


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
    prompt: Prompt = Field(description="What to draw, 1-2000 characters. webui weighting `(word:1.3)`, "
                           "`(word)`, `[word]` and `BREAK` work; longer than 77 tokens is chunked "
                           "(SD1.5/SDXL).")
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
                                 "LoRAs to apply with their weights, up to 5.")

    @model_validator(mode="after")
    def _mode_inputs(self) -> GenerationSpec:
        # Raised as a ValidationError so each error is reported at its field (`init_image`),
        # not at the whole body as a validator's ValueError would be.
        errors: list[InitErrorDetails] = []

        def refuse(loc: tuple[str | int, ...], message: str, value: Any) -> None:
            errors.append(InitErrorDetails(type=PydanticCustomError(
                "value_error", "{reason}", {"reason": message}), loc=loc, input=value))

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




def _fit_size(size: tuple[int, int], *, max_size: int, min_size: int,
              multiple: int = 8) -> tuple[int, int]:
    """An input image's size as a generation size: within the preset's limits, and a multiple
    of what the family's latents need."""
    w, h = size
    scale = min(1.0, max_size / max(w, h))
    w, h = round(w * scale), round(h * scale)
    return max(min_size, w - w % multiple), max(min_size, h - h % multiple)


def resolve_generation(
    spec: GenerationSpec, *, registry: ModelRegistry, default_model: str,
    input_size: tuple[int, int] | None = None,
) -> GenerationSpec:
    """Check the spec against its model preset and fill every field the server chooses.

    ``input_size`` is the init image's size: img2img and inpaint default to it (scaled into
    the preset's limits), and outpainting's canvas is it plus the added borders.
    """
    errors: list[dict[str, Any]] = []
    model_name = spec.model or default_model
    preset = registry.get(model_name)
    if preset is None:
        raise ValidationFailed([{
            "field": "model",
            "message": f"unknown model {model_name!r}; known: {', '.join(registry.names())}",
        }])
    limits = preset.limits
    default_w = default_h = limits.default_size
    if input_size is not None:
        default_w, default_h = _fit_size(input_size, max_size=limits.max_size,
                                         min_size=limits.min_size, multiple=limits.size_multiple)
    if spec.mode == GenerationMode.OUTPAINT and spec.outpaint is not None:
        pad = spec.outpaint
        default_w += pad.left + pad.right
        default_h += pad.top + pad.bottom
        for field, given, derived in (("width", spec.width, default_w),
                                      ("height", spec.height, default_h)):
            if given is not None and given != derived:
                errors.append({"field": field, "message": f"outpainting makes the canvas {derived}"
                               " px (image + borders); leave it out or send that value"})
    width = spec.width or default_w
    height = spec.height or default_h
    for field, value in (("width", width), ("height", height)):
        if not limits.min_size <= value <= limits.max_size:
            errors.append({
                "field": field,
                "message": f"{model_name} supports {limits.min_size}-{limits.max_size} px",
            })
        elif value % limits.size_multiple:
            errors.append({"field": field, "message": f"{preset.family.value} models need a "
                           f"multiple of {limits.size_multiple} px (got {value})"})
    steps = spec.steps or limits.default_steps
    if steps > limits.max_steps:
        errors.append({"field": "steps", "message": f"{model_name} allows at most "
                       f"{limits.max_steps} steps"})
    scheduler = spec.scheduler
    if scheduler is not None:
        canonical = canonical_scheduler(scheduler)
        if canonical is None or canonical not in limits.schedulers:
            errors.append({"field": "scheduler", "message": f"{scheduler!r} is not available "
                           f"for {preset.family}; choose one of: {', '.join(limits.schedulers)}"})
        scheduler = canonical
    for index, control in enumerate(spec.controls):
        if control.type not in preset.controlnets:
            have = ", ".join(sorted(preset.controlnets)) or "none"
            errors.append({"field": f"controls.{index}.type", "message": f"{model_name} has no "
                           f"{control.type.value} ControlNet (available: {have})"})
    strength = spec.strength
    if strength is None and spec.mode != GenerationMode.TXT2IMG:
        strength = 0.75 if spec.mode == GenerationMode.IMG2IMG else 1.0
    if strength is not None and int(steps * strength) < 1:
        # diffusers denoises int(steps * strength) steps; zero would fail in the worker.
        errors.append({"field": "strength", "message": f"strength {strength} x {steps} steps "
                       "leaves no denoising step; raise strength or steps"})
    if errors:
        raise ValidationFailed(errors)
    return spec.model_copy(update={
        "strength": strength,
        "model": model_name,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance_scale": (spec.guidance_scale if spec.guidance_scale is not None
                           else limits.default_guidance),
        "seed": spec.seed if spec.seed is not None else secrets.randbelow(MAX_SEED + 1),
        "scheduler": scheduler,
    })


class LoraRef(BaseModel):
    """A LoRA as the worker needs it: where its file is and what to check it against."""

    id: str
    name: str
    key: str
    sha256: str
    weight: float


class SafetyPolicy(BaseModel):
    action: Literal["blur", "withhold"]
    threshold: float = Field(ge=0, le=1)


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


class ArtifactRef(BaseModel):
    """An object a job wrote, as the worker reports it in its ``succeeded`` event."""

    key: str = Field(description="Storage key of the object, under the job's prefix.")
    kind: Literal["image", "manifest", "contact_sheet", "metadata", "results", "lora", "sample",
                  "checkpoint", "metrics", "loss_curve"] = Field(description="What the object is.")
    index: int | None = Field(default=None, description="Images: position in the job's output; null for "
                              "other kinds.")
    content_type: str = Field(description="MIME type of the object.")
    size: int = Field(description="Size in bytes.")
    sha256: str = Field(description="SHA-256 of the bytes, hex.")
    width: int | None = Field(default=None, description="Images: width in pixels.")
    height: int | None = Field(default=None, description="Images: height in pixels.")
    seed: int | None = Field(default=None, description="Images: the seed this image was generated with.")


class GenerationManifest(BaseModel):
    """Everything needed to reproduce an output, stored beside it as ``manifest.json``."""

    job_id: str
    tenant_id: str
    spec: GenerationSpec
    model: dict[str, Any]
    scheduler: str
    seeds: list[int]
    images: list[ArtifactRef]
    versions: dict[str, str]
    device: str
    timings: dict[str, float]
    created_at: datetime
    pipeline: str = ""
    inputs: dict[str, str] = Field(default_factory=dict)
    loras: list[dict[str, Any]] = Field(default_factory=list)
    safety: list[dict[str, Any]] = Field(default_factory=list)
    prompt_encoding: str = "plain"
    # Per image, only when a pipeline ran diffusers' own checker (which blacks out what it
    # flags); Loomis loads pipelines without it, so this is normally absent.
    nsfw_content_detected: list[bool] | None = None


MAX_SWEEP_CELLS = 64


class SweepAxis(RequestModel):
    model_config = ConfigDict(extra="forbid")

    param: Literal["guidance_scale", "steps", "seed", "scheduler", "strength", "prompt",
                   "negative_prompt"] = Field(description="The spec field this axis varies.")
    # Strict: a JSON true is not the number 1 (nor a seed of 1) and was accepted as one.
    values: Annotated[list[StrictInt | StrictFloat | StrictStr], MULTILINE] = Field(
        min_length=1, max_length=32,
        description="The values it takes, 1-32; each is validated as that field.",
    )


class SweepSpec(RequestModel):
    """Every combination of one or two parameter axes over a base spec, plus a contact sheet."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "base": {"prompt": "a lighthouse at dusk", "model": "tiny-sd15", "steps": 4},
            "axes": [{"param": "guidance_scale", "values": [2, 5, 7.5, 10, 15]},
                     {"param": "seed", "values": [42, 123]}],
        }]},
    )

    base: GenerationSpec = Field(description="The generation every cell starts from (num_images 1).")
    axes: list[SweepAxis] = Field(min_length=1, max_length=2, description="The first axis runs "
                                  "along the sheet's columns, the second down its rows.")
    title: str = Field(default="", max_length=200, description="Printed at the top of the contact sheet.")

    @model_validator(mode="after")
    def _grid(self) -> SweepSpec:
        # Each error at the field a client has to change (`axes`, `base.num_images`), not `body`.
        errors: list[InitErrorDetails] = []

        def refuse(loc: tuple[str | int, ...], message: str, value: Any) -> None:
            errors.append(InitErrorDetails(type=PydanticCustomError(
                "value_error", "{reason}", {"reason": message}), loc=loc, input=value))

        if len(self.axes) == 2 and self.axes[0].param == self.axes[1].param:
            refuse(("axes", 1, "param"), "the two axes must vary different parameters",
                   self.axes[1].param)
        cells = 1
        for axis in self.axes:
            cells *= len(axis.values)
        if cells > MAX_SWEEP_CELLS:
            refuse(("axes",), f"{cells} cells; a sweep makes at most {MAX_SWEEP_CELLS}", cells)
        if self.base.num_images != 1:
            refuse(("base", "num_images"), "a sweep renders one image per cell: leave it at 1",
                   self.base.num_images)
        if errors:
            raise PydanticValidationError.from_exception_data(type(self).__name__, errors)
        return self


class SweepCell(BaseModel):
    index: int
    row: int
    col: int
    labels: dict[str, Any]
    spec: GenerationSpec


class SweepTask(BaseModel):
    job_id: str
    tenant_id: str
    sweep: SweepSpec
    cells: list[SweepCell]
    inputs: dict[str, str] = Field(default_factory=dict)
    loras: list[LoraRef] = Field(default_factory=list)
    safety: SafetyPolicy | None = None


def sweep_cells(sweep: SweepSpec, *, resolve: Any) -> list[SweepCell]:
    """Expand the grid; ``resolve`` turns each cell's spec into a resolved one (raising
    :class:`ValidationFailed`), and errors are re-addressed to ``axes.N.values.M``."""
    cols = sweep.axes[0]
    rows = sweep.axes[1] if len(sweep.axes) > 1 else None
    base = sweep.base.model_dump(mode="json", exclude_unset=True)
    cells: list[SweepCell] = []
    errors: list[dict[str, Any]] = []
    for r, row_value in enumerate(rows.values if rows else [None]):
        for c, col_value in enumerate(cols.values):
            fields = dict(base)
            labels: dict[str, Any] = {cols.param: col_value}
            fields[cols.param] = col_value
            if rows is not None:
                fields[rows.param] = row_value
                labels[rows.param] = row_value
            try:
                spec = resolve(GenerationSpec.model_validate(fields))
            except ValidationFailed as exc:
                for error in exc.errors:
                    # A field no axis varies (e.g. strength x steps) fails because of this
                    # cell's combination: name the column value and say which cell it is.
                    on_rows = rows is not None and error["field"] == rows.param
                    axis, index = (1, r) if on_rows else (0, c)
                    where = "" if error["field"] in (cols.param, rows.param if rows else None) \
                        else f" (cell {labels}: {error['field']})"
                    errors.append({"field": f"axes.{axis}.values.{index}",
                                   "message": error["message"] + where})
                continue
            except PydanticValidationError as exc:
                for detail in exc.errors():
                    loc = detail.get("loc") or ()
                    axis = 1 if rows is not None and loc and loc[0] == rows.param else 0
                    index = c if axis == 0 else r
                    errors.append({"field": f"axes.{axis}.values.{index}",
                                   "message": str(detail.get("msg"))})
                continue
            cells.append(SweepCell(index=len(cells), row=r, col=c, labels=labels, spec=spec))
    if errors:
        unique = {(e["field"], e["message"]): e for e in errors}
        raise ValidationFailed(list(unique.values()))
    return cells


class CaptionOptions(RequestModel):
    """BLIP-class captioning (kohya's make_captions.py options)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=8, ge=1, le=64, description="Images captioned per model call.")
    max_length: int = Field(default=40, ge=5, le=200, description="Tokens, start token included.")
    min_length: int = Field(default=5, ge=1, le=100, description="Fewest tokens in a caption.")
    num_beams: int = Field(default=1, ge=1, le=8, description="Beam search width; 1 is greedy (or sampling "
                           "with do_sample).")
    do_sample: bool = Field(default=False, description="Nucleus sampling (with num_beams 1).")
    top_p: float = Field(default=0.9, gt=0, le=1, description="Nucleus sampling: keep the smallest set of "
                         "tokens with this much probability.")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Same seed, same captions.")
    overwrite: bool = Field(default=False, description="Replace captions an image already "
                            "has; by default only missing ones are filled.")

    @model_validator(mode="after")
    def _consistent(self) -> CaptionOptions:
        if self.min_length > self.max_length:
            raise ValueError("min_length must not exceed max_length")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("sampling uses num_beams 1")
        return self


class TagOptionsSpec(RequestModel):
    """WD14-class tagging (kohya's tag_images_by_wd14_tagger.py options)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=8, ge=1, le=64, description="Images tagged per model call.")
    general_threshold: float = Field(default=0.35, ge=0, le=1, description="Keep general tags at or above "
                                     "this probability.")
    character_threshold: float = Field(default=0.35, ge=0, le=1, description="Keep character tags at or "
                                       "above this probability.")
    undesired: list[str] = Field(default_factory=list, max_length=500, description="Tags never written, "
                                 "whatever their spelling (`long_hair` also drops `long hair`).")
    underscores_to_spaces: bool = Field(default=True, description="Write `long hair`, not `long_hair`.")
    keep_rating: bool = Field(default=False, description="Put the most likely rating tag after the prefix.")
    prefix: list[str] = Field(default_factory=list, max_length=20, description="Always first, "
                              "e.g. the subject's identifier token.")
    character_first: bool = Field(default=True, description="Character tags before general ones.")
    escape: bool = Field(default=False, description="Escape ( ) so prompts read them literally.")
    overwrite: bool = Field(default=True, description="Replace an image's tags; false adds new ones to "
                            "those it has.")


class CleanOptions(RequestModel):
    """Caption/tag cleaning, kohya's clean_captions_and_tags.py step."""

    model_config = ConfigDict(extra="forbid")

    strip_rating: bool = Field(default=True, description="Drop rating tags and `rating:` tokens (general, "
                               "sensitive, questionable, explicit).")
    replacements: list[tuple[str, str]] = Field(default_factory=list, max_length=200,
                                                description="[from, to] pairs applied in order to captions "
                                                "and tags, e.g. [\"1girl\", \"a woman\"].")


class TaggingSpec(RequestModel):
    """Caption and/or tag a dataset's images, then clean; results land on the items."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"dataset_id": "1f0c3e6d-8a4b-4d2e-9f0a-1b2c3d4e5f60",
         "caption": {"batch_size": 8, "num_beams": 3, "max_length": 40},
         "tags": {"general_threshold": 0.35, "prefix": ["sks"], "undesired": ["simple background"]},
         "clean": {"replacements": [["1girl", "a woman"]]}, "write_caption_files": True},
    ]})

    dataset_id: str = Field(min_length=1, max_length=64, description="The dataset whose images are "
                            "captioned and tagged.")
    caption: CaptionOptions | None = Field(default_factory=CaptionOptions, description="BLIP-class "
                                           "captioning; null skips it.")
    tags: TagOptionsSpec | None = Field(default_factory=TagOptionsSpec, description="WD14-class tagging; "
                                        "null skips it.")
    clean: CleanOptions | None = Field(default_factory=CleanOptions, description="Caption and tag "
                                       "cleaning, after the other two; null skips it.")
    write_caption_files: bool = Field(default=False, description="Also store `<image>.caption` "
                                      "files beside the images.")
    prefix_trigger: bool = Field(default=True, description="Put a DreamBooth subset's identifier "
                                 "and class (`sks dog` of folder `10_sks dog`) first in the captions "
                                 "and tags this job writes, unless already there: in kohya a caption "
                                 "replaces the class tokens, so without it training never sees the "
                                 "trigger. Captions the job does not write are left as they are.")

    @model_validator(mode="after")
    def _something(self) -> TaggingSpec:
        if self.caption is None and self.tags is None and self.clean is None:
            raise ValueError("enable at least one of caption, tags or clean")
        return self


class TaggingItem(BaseModel):
    id: str
    key: str
    path: str
    caption: str | None = None
    tags: list[str] = Field(default_factory=list)
    trigger: str | None = None  # its DreamBooth subset's identifier and class


class TaggingTask(BaseModel):
    job_id: str
    tenant_id: str
    spec: TaggingSpec
    items: list[TaggingItem]
    caption_extension: str = ".caption"
    output_prefix: str

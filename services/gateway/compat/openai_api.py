"""The OpenAI Images API (``/v1/images/…``) as a thin layer over Loomis generation jobs.

Existing code written for the official ``openai`` client points its ``base_url`` at Loomis and
changes nothing else: each request becomes ordinary jobs (``jobs.run``), and the answer is an
``ImagesResponse``. Errors use OpenAI's envelope ``{"error": {message, type, param, code}}``
with the statuses the client maps to its exception classes. The client retries 408, 409, 429
and every 5xx twice: a 5xx here (a failed job, a wait that ran out) says
``x-should-retry: false``, since retrying would render the job again.
"""

from __future__ import annotations

import base64
import io
import re
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from services.gateway.compat import jobs
from services.gateway.db.models import Tenant
from services.gateway.deps import GatewayState, SessionDep, StateDep, TenantDep
from services.gateway.images import decode_image
from services.gateway.multipart import parse_fields, read_multipart
from services.gateway.problems import ERROR_SHAPES
from shared.errors import ValidationFailed
from shared.keys import job_prefix
from shared.models import ModelPreset
from shared.specs import GenerationMode, GenerationSpec, MaskSpec
from shared.text import RequestModel


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="What went wrong.")
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error.")
    param: str | None = Field(description="The offending parameter, if one.")
    code: str | None = Field(description="A stable code (Loomis' problem code).")


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail = Field(description="OpenAI's error envelope.")


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIError, "description": text} for status, text in (
        (400, "Invalid request (`param` names the field)"), (401, "Missing or unknown key"),
        (404, "Not found"), (409, "Conflict"), (422, "Not sent (400 instead)"),
        (429, "The queue is unavailable: retry after `retry-after`"),
        (500, "The job failed (`x-should-retry: false`)"),
        (504, "The job did not finish in LOOMIS_COMPAT__WAIT_S (`x-should-retry: false`); "
              "the message names it"))}
router = APIRouter(tags=["openai-compatible"], responses=_ERRORS)

# quality -> steps as a share of the preset's default; style -> guidance added to the preset's
QUALITY_STEPS = {"low": 0.5, "medium": 1.0, "standard": 1.0, "auto": 1.0, "high": 1.5, "hd": 1.5}
STYLE_GUIDANCE = {"natural": 0.0, "vivid": 2.0}
FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"),
           "webp": ("WEBP", "image/webp")}
MAX_N = 10


def _invalid(param: str, message: str, code: str = "invalid_value") -> ValidationFailed:
    error = ValidationFailed([{"field": param, "message": message}])
    error.status, error.code = 400, code
    return error


class _Options(RequestModel):
    """What generations, edits and variations share; every field may be null (the client
    sends an explicit null for a keyword passed as None)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, max_length=100, description="A Loomis preset, or "
                              "an OpenAI model name mapped to one (LOOMIS_COMPAT__OPENAI_MODELS).")
    n: int | None = Field(default=None, ge=1, le=MAX_N, description="Images, 1-10.")
    size: str | None = Field(default=None, max_length=20, description="`WxH` (snapped to the "
                             "model's multiple) or `auto` (the model's default).")
    response_format: Literal["url", "b64_json"] | None = Field(
        default=None, description="`b64_json` (default) or `url` (a presigned URL).")
    user: str | None = Field(default=None, max_length=256, description="Recorded with the job.")


class _Rendering(_Options):
    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = Field(
        default=None, description="Steps: low = half the model's default, high/hd = 1.5x, "
        "others the default.")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(default=None,
                                                                 description="Default png.")
    output_compression: int | None = Field(default=None, ge=0, le=100, description="jpeg/webp "
                                           "quality, 0-100 (default 90).")
    background: Literal["opaque", "auto", "transparent"] | None = Field(
        default=None, description="`opaque`/`auto`; `transparent` is refused (no alpha).")
    moderation: Literal["auto", "low"] | None = Field(default=None, description="Accepted; the "
                                                      "tenant's own safety filter applies.")
    stream: bool | None = Field(default=None, description="Only false: no partial images.")
    partial_images: int | None = Field(default=None, ge=0, le=0, description="Only 0.")


class GenerationRequest(_Rendering):
    prompt: str = Field(min_length=1, max_length=2000, description="What to draw.")
    style: Literal["vivid", "natural"] | None = Field(default=None, description="natural: the "
                                                       "model's guidance; vivid: 2 more.")


class EditFields(_Rendering):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=2000)
    input_fidelity: Literal["low", "high"] | None = Field(default=None, description="Accepted; "
                                                          "unmasked pixels are kept exactly.")


class VariationFields(_Options):
    pass


class ImageData(BaseModel):
    b64_json: str | None = Field(default=None, description="The image, base64.")
    url: str | None = Field(default=None, description="A presigned URL of the image.")
    revised_prompt: str | None = Field(default=None, description="The prompt as it ran.")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix seconds.")
    data: list[ImageData] = Field(description="One per image.")
    output_format: str = Field(description="png, jpeg or webp.")
    size: str = Field(description="`WxH` as made.")
    quality: str = Field(description="As asked (auto by default).")
    background: str = Field(default="opaque", description="Always opaque.")
    usage: dict[str, Any] = Field(description="Words of the prompt (Loomis does not bill "
                                  "tokens).")


def openai_error(request: Request, *, status: int, code: str, title: str, detail: str,
                 errors: list[dict[str, Any]] | None,
                 headers: dict[str, str] | None) -> JSONResponse:
    """Loomis problems in OpenAI's envelope; a field error names its ``param``."""
    param = str(errors[0]["field"]) if errors else None
    message = detail
    if errors:
        message = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in errors)
    status = {422: 400, 413: 400, 415: 400, 503: 429}.get(status, status)
    kind = {400: "invalid_request_error", 401: "invalid_request_error",
            404: "invalid_request_error", 405: "invalid_request_error",
            409: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "server_error")
    out = dict(headers or {})
    if status == 429:
        out["retry-after"] = "5"
    if status >= 500:
        out["x-should-retry"] = "false"  # the job ran (or runs): a retry would run it again
    if status == 401:
        code = "invalid_api_key"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status, headers=out)


def install(app: Any) -> None:
    for prefix in ("/v1/images/", "/images/"):
        ERROR_SHAPES.append((prefix, openai_error))
    app.include_router(router, prefix="/v1")
    app.include_router(router, include_in_schema=False)  # base_url without /v1


def _preset(state: GatewayState, model: str | None) -> ModelPreset:
    name = model or state.settings.generator.default_model
    name = state.settings.compat.openai_models.get(name, name)
    preset = state.registry.get(name)
    if preset is None:
        raise _invalid("model", f"the model {model!r} does not exist here; use one of "
                       f"{', '.join(state.registry.names())} or a mapped OpenAI name "
                       f"({', '.join(state.settings.compat.openai_models)})", "model_not_found")
    return preset


def _size(preset: ModelPreset, size: str | None) -> tuple[int, int] | None:
    """``WxH`` snapped to the family's multiple; None for the model's default (``auto``)."""
    if size in (None, "auto"):
        return None
    assert size is not None
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if match is None:
        raise _invalid("size", f"{size!r} is not `WIDTHxHEIGHT` or `auto`")
    limits = preset.limits
    snapped = []
    for value in (int(match[1]), int(match[2])):
        value = round(value / limits.size_multiple) * limits.size_multiple
        if not limits.min_size <= value <= limits.max_size:
            raise _invalid("size", f"{size} is outside what {preset.name} makes "
                           f"({limits.min_size}-{limits.max_size} px a side)")
        snapped.append(value)
    return snapped[0], snapped[1]


def _rendering(options: _Rendering, preset: ModelPreset) -> dict[str, Any]:
    if options.background == "transparent":
        raise _invalid("background", "transparent backgrounds are not made here (no alpha)")
    if options.stream:
        raise _invalid("stream", "streaming partial images is not supported; leave it false")
    fmt = options.output_format or "png"
    if options.output_compression is not None and fmt == "png":
        raise _invalid("output_compression", "applies to jpeg and webp only")
    limits = preset.limits
    steps = max(1, min(limits.max_steps, round(limits.default_steps
                                               * QUALITY_STEPS[options.quality or "auto"])))
    return {"steps": steps}


def _encode(png: bytes, fmt: str, compression: int | None) -> bytes:
    if fmt == "png":
        return png
    with Image.open(io.BytesIO(png)) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=FORMATS[fmt][0],
                                  quality=90 if compression is None else compression)
    return buffer.getvalue()


async def _answer(state: GatewayState, tenant: Tenant, outcome: jobs.Outcome, *,
                  options: _Options, fmt: str, compression: int | None,
                  quality: str | None) -> ImagesResponse:
    data = []
    for image in outcome.images:
        encoded = _encode(image.png, fmt, compression)
        item = ImageData(revised_prompt=outcome.jobs[0].spec.get("prompt"))
        if options.response_format == "url":
            key = image.key
            if fmt != "png":  # beside the PNG, under the job's prefix (deleted with it)
                key = f"{job_prefix(tenant.id, image.job_id)}{image.index}.{fmt}"
                await state.store.put(key, encoded, content_type=FORMATS[fmt][1])
            item.url = state.store.presign_get(key)
        else:
            item.b64_json = base64.b64encode(encoded).decode()
        data.append(item)
    spec = outcome.jobs[0].spec
    words = len(str(spec.get("prompt", "")).split())
    return ImagesResponse(
        created=int(time.time()), data=data, output_format=fmt,
        size=f"{spec.get('width')}x{spec.get('height')}", quality=quality or "auto",
        usage={"input_tokens": words, "output_tokens": 0, "total_tokens": words,
               "input_tokens_details": {"text_tokens": words, "image_tokens": 0},
               "note": "words of the prompt, not billing tokens: Loomis does not bill"})


def _origin(options: _Options, api: str) -> dict[str, Any]:
    return {"api": api, **({"user": options.user} if options.user else {})}


@router.post("/images/generations", response_model=ImagesResponse,
             summary="Create images (OpenAI Images API)")
async def create_images(body: GenerationRequest, session: SessionDep, tenant: TenantDep,
                        state: StateDep) -> ImagesResponse:
    """`POST /v1/images/generations` as the `openai` client sends it; each request is a
    Loomis generation job (see `compat` in the job's spec)."""
    preset = _preset(state, body.model)
    size = _size(preset, body.size)
    rendering = _rendering(body, preset)
    guidance = preset.limits.default_guidance + STYLE_GUIDANCE[body.style or "natural"]
    spec = _spec(prompt=body.prompt, model=preset.name, size=size, n=body.n, extra={
        **rendering, "guidance_scale": guidance})
    outcome = await jobs.run(session=session, state=state, tenant=tenant, spec=spec,
                             total=body.n or 1, origin=_origin(body, "openai.images.generate"))
    return await _answer(state, tenant, outcome, options=body, fmt=body.output_format or "png",
                         compression=body.output_compression, quality=body.quality)


def _spec(*, prompt: str, model: str, size: tuple[int, int] | None, n: int | None,
          extra: dict[str, Any]) -> GenerationSpec:
    fields: dict[str, Any] = {"prompt": prompt, "model": model, **extra}
    if size is not None:
        fields["width"], fields["height"] = size
    try:
        return GenerationSpec.model_validate(fields)
    except PydanticValidationError as exc:
        error = ValidationFailed([{"field": ".".join(str(p) for p in e["loc"]) or "prompt",
                                   "message": e["msg"]} for e in exc.errors()])
        error.status = 400
        raise error from exc


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _edit_area(image: Image.Image, mask: Image.Image | None) -> Image.Image | None:
    """OpenAI's convention: transparent pixels (of the mask, else of the image) are edited.
    Returns Loomis' mask (white repaints), or None when nothing is transparent."""
    source = mask if mask is not None else image
    if "A" not in source.getbands():
        if mask is not None:
            raise _invalid("mask", "the mask needs an alpha channel: its transparent pixels "
                           "mark the area to edit")
        return None
    area = source.getchannel("A").point(lambda alpha: 255 if alpha < 128 else 0)
    if area.getbbox() is None:
        if mask is not None:
            raise _invalid("mask", "the mask has no transparent pixels: nothing to edit")
        return None
    return area


async def _read_image(part: Any, field: str) -> Image.Image:
    with part.open() as file:
        return decode_image(file.read(), field=field, mode="RGBA").image


async def _read_mask(part: Any) -> Image.Image:
    """The mask, which must carry alpha (its transparent pixels are the edit): decoded as
    RGBA, one without alpha became fully opaque and was refused as having "no transparent
    pixels", which is not what is wrong with it."""
    with part.open() as file:
        data = file.read()
    mask = decode_image(data, field="mask", mode="RGBA").image
    with Image.open(io.BytesIO(data)) as probe:  # checked above; the header alone is read
        if "A" not in probe.getbands() and "transparency" not in probe.info:
            raise _invalid("mask", f"the mask ({probe.format} {probe.mode}) has no alpha "
                           "channel: send a PNG whose transparent pixels mark the area to edit")
    return mask


@router.post("/images/edits", response_model=ImagesResponse,
             summary="Edit an image (OpenAI Images API)",
             openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["image", "prompt"], "properties": {
                     "image": {"type": "string", "format": "binary"},
                     "mask": {"type": "string", "format": "binary"},
                     **EditFields.model_json_schema()["properties"]}}}}}})
async def edit_image(request: Request, session: SessionDep, tenant: TenantDep,
                     state: StateDep) -> ImagesResponse:
    """The first `image` (or `image[]`) is edited where the `mask` is transparent (or, with no
    mask, where the image itself is); unmasked pixels are kept exactly. With neither, img2img
    at `LOOMIS_COMPAT__EDIT_STRENGTH` (0.75)."""
    async with read_multipart(request, max_bytes=40 * 1024 * 1024, file_field="image",
                              max_files=18, max_fields=24) as form:
        fields = parse_fields(EditFields, form, file_fields=("image", "image[]", "mask"))
        images = form.files_of("image") + form.files_of("image[]")
        if not images:
            raise _invalid("image", "send the image to edit as `image`")
        image = await _read_image(images[0], "image")
        masks = form.files_of("mask")
        if len(masks) > 1:
            raise _invalid("mask", f"send one mask (got {len(masks)})")
        mask = await _read_mask(masks[0]) if masks else None
    preset = _preset(state, fields.model)
    if mask is not None and mask.size != image.size:
        raise _invalid("mask", f"the mask is {mask.width}x{mask.height}; the image is "
                       f"{image.width}x{image.height}")
    area = _edit_area(image, mask)
    init = _data_url(image.convert("RGB"))
    extra: dict[str, Any] = {**_rendering(fields, preset), "init_image": init}
    if area is not None:
        extra.update(mode=GenerationMode.INPAINT, mask=MaskSpec(image=_data_url(area)))
    else:
        extra.update(mode=GenerationMode.IMG2IMG, strength=state.settings.compat.edit_strength)
    spec = _spec(prompt=fields.prompt, model=preset.name, size=_size(preset, fields.size),
                 n=fields.n, extra=extra)
    outcome = await jobs.run(session=session, state=state, tenant=tenant, spec=spec,
                             total=fields.n or 1, origin=_origin(fields, "openai.images.edit"))
    return await _answer(state, tenant, outcome, options=fields,
                         fmt=fields.output_format or "png",
                         compression=fields.output_compression, quality=fields.quality)


@router.post("/images/variations", response_model=ImagesResponse,
             summary="Variations of an image (OpenAI Images API)",
             openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["image"], "properties": {
                     "image": {"type": "string", "format": "binary"},
                     **VariationFields.model_json_schema()["properties"]}}}}}})
async def image_variations(request: Request, session: SessionDep, tenant: TenantDep,
                           state: StateDep) -> ImagesResponse:
    """img2img of the image at `LOOMIS_COMPAT__VARIATION_STRENGTH` (0.6) with the prompt
    `LOOMIS_COMPAT__VARIATION_PROMPT` (empty: the image alone guides)."""
    async with read_multipart(request, max_bytes=40 * 1024 * 1024, file_field="image",
                              max_files=1, max_fields=16) as form:
        fields = parse_fields(VariationFields, form, file_fields=("image",))
        parts = form.files_of("image")
        if not parts:
            raise _invalid("image", "send the image as `image`")
        image = await _read_image(parts[0], "image")
    preset = _preset(state, fields.model)
    compat = state.settings.compat
    spec = _spec(prompt=compat.variation_prompt, model=preset.name,
                 size=_size(preset, fields.size), n=fields.n, extra={
                     "mode": GenerationMode.IMG2IMG, "strength": compat.variation_strength,
                     "init_image": _data_url(image.convert("RGB"))})
    outcome = await jobs.run(session=session, state=state, tenant=tenant, spec=spec,
                             total=fields.n or 1, origin=_origin(fields, "openai.images.vary"))
    return await _answer(state, tenant, outcome, options=fields, fmt="png", compression=None,
                         quality=None)


"""The AUTOMATIC1111 webui API (``/sdapi/v1/…``, ``/controlnet/…``) over Loomis jobs.

Written for what the ``webuiapi`` client and webui plug-ins send: every txt2img/img2img is
ordinary generation jobs (in ``/v1/jobs``, with ``compat`` in their spec), answered in webui's
shape (raw-base64 PNGs carrying webui's ``parameters`` text, ``info`` as a JSON string). A
field Loomis cannot honour with a value that would change the result (``enable_hr``,
``restore_faces``, ``tiling``, scripts, …) is refused with a 400 naming it, never ignored.

Credentials: HTTP Basic with the API key as the password (``--api-auth``'s clients), or
Bearer; with ``LOOMIS_COMPAT__A1111_OPEN`` a configured tenant is implied for requests
without any.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials
from PIL import Image, ImageFilter, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy import select

from services.gateway.auth.service import hash_key
from services.gateway.compat import jobs
from services.gateway.compat.a1111_params import (
    MODULES,
    RESIZE_MODES,
    SAMPLER_ALIASES,
    SAMPLERS,
    SCHEDULE_TYPES,
    data_url,
    fit,
    image_of,
    infotext,
    invalid,
    loomis_scheduler,
    lora_tags,
    masked_region,
    prefill,
    webui_mask,
    webui_sampler,
)
from services.gateway.db.models import CompatOption, Job, JobEventRow, Lora, Tenant
from services.gateway.deps import GatewayState, SessionDep, StateDep, bearer_auth
from services.gateway.images import MAX_INPUT_PIXELS
from services.gateway.jobs.service import cancel_job
from services.gateway.problems import ERROR_SHAPES
from shared.errors import Conflict, Unauthorized, ValidationFailed
from shared.models import ControlType, ModelFamily, ModelPreset
from shared.specs import ControlSpec, GenerationMode, GenerationSpec, LoraUse, MaskSpec
from shared.text import MULTILINE, RequestModel


class A1111Error(BaseModel):
    """webui's error body; ``fields`` (Loomis') names each offending field."""

    error: str = Field(description="What kind of error (a Loomis problem code).")
    detail: str = Field(description="What went wrong, naming the field.")
    body: str = Field(description="Empty (webui's own field).")
    errors: str = Field(description="`<status>: <detail>`, as webui writes it.")
    fields: list[dict[str, Any]] = Field(description="`{field, message}` per problem.")


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": A1111Error, "description": text} for status, text in (
        (400, "A field Loomis cannot honour, or an invalid value (named in `detail`)"),
        (401, "Missing or unknown API key"), (404, "Not found"), (413, "Too large"),
        (415, "Not JSON"), (422, "Invalid JSON fields"),
        (500, "The job failed (its id in `detail`)"), (503, "The queue is unavailable"),
        (504, "The job did not finish in LOOMIS_COMPAT__WAIT_S; its id is in `detail`"))}
router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111-compatible"], responses=_ERRORS)
MAX_IMAGES = 64  # batch_size x n_iter of one request
# a Loomis spec field's name in webui's request
_WEBUI_FIELDS = {"guidance_scale": "cfg_scale", "num_images": "batch_size",
                 "init_image": "init_images", "strength": "denoising_strength",
                 "scheduler": "sampler_name", "controls": "alwayson_scripts.ControlNet.args"}
controlnet_router = APIRouter(prefix="/controlnet", tags=["automatic1111-compatible"],
                              responses=_ERRORS)


def a1111_error(request: Request, *, status: int, code: str, title: str, detail: str,
                errors: list[dict[str, Any]] | None,
                headers: dict[str, str] | None) -> JSONResponse:
    """webui's error body (``{error, detail, body, errors}``), the field named in ``detail``."""
    if errors:
        detail = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in errors)
    return JSONResponse({"error": code, "detail": detail, "body": "",
                         "errors": f"{status}: {detail}", "fields": errors or []},
                        status_code=status, headers=headers)


def install(app: Any) -> None:
    for prefix in ("/sdapi/", "/controlnet/"):
        ERROR_SHAPES.append((prefix, a1111_error))
    app.include_router(router)
    app.include_router(controlnet_router)


class Caller(BaseModel):
    """Who calls: the tenant, and the key (hashed) its settings are kept under."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    tenant: Any
    key: str


basic_auth = HTTPBasic(scheme_name="basicAuth", auto_error=False,
                       description="webui's --api-auth: any user name, the API key as password.")


async def caller(state: StateDep, session: SessionDep,
                 _basic: Annotated[HTTPBasicCredentials | None, Security(basic_auth)],
                 _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_auth)],
                 authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
                 ) -> Caller:
    """Basic (the key as password, or as user name with an empty password) or Bearer."""
    token = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            token = value.strip()
        elif scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (binascii.Error, ValueError) as exc:  # UnicodeDecodeError is a ValueError
                raise Unauthorized("malformed Basic credentials", code="invalid_api_key") from exc
            token = password or user
    if token:
        tenant = await state.api_keys.tenant(hash_key(token))
        if tenant is None:
            raise Unauthorized("unknown or revoked API key (send it as the Basic password)",
                               code="invalid_api_key")
        return Caller(tenant=tenant, key=hash_key(token))
    compat = state.settings.compat
    if compat.a1111_open and compat.a1111_tenant:
        tenant = await session.scalar(select(Tenant).where(Tenant.name == compat.a1111_tenant))
        if tenant is not None:
            return Caller(tenant=tenant, key=f"open:{tenant.id}")
    raise Unauthorized("send the API key as the HTTP Basic password (webui --api-auth)",
                       code="missing_api_key")


CallerDep = Annotated[Caller, Depends(caller)]


_DOCS = {
    "prompt": "The prompt; `<lora:name:weight>` applies your LoRA of that name.",
    "negative_prompt": "What to steer away from.",
    "styles": "Saved styles: refused when not empty.",
    "seed": "-1: drawn (the answer's `info.seed`); image i uses seed + i.",
    "subseed": "Unused while subseed_strength is 0.",
    "subseed_strength": "Variation seeds: refused when not 0.",
    "seed_resize_from_h": "Refused when over 0.", "seed_resize_from_w": "Refused when over 0.",
    "sampler_name": "Euler a, Euler, DPM++ 2M, DDIM, UniPC, Heun, LMS, PLMS, DPM2, DPM2 a, "
                    "DPM++ 2S (GET /sdapi/v1/samplers).",
    "sampler_index": "Read when sampler_name is empty.",
    "scheduler": "Schedule type: automatic, or karras (DPM++ 2M).",
    "batch_size": "Images per batch; batch_size x n_iter at most 64.",
    "n_iter": "Batches.", "steps": "Denoising steps.", "cfg_scale": "Guidance scale.",
    "width": "Pixels, a multiple of the model's.", "height": "Pixels, a multiple of the model's.",
    "restore_faces": "Refused when true.", "tiling": "Refused when true.",
    "eta": "DDIM: applied (0-1). Euler a, DPM2 a: 1 only. Other samplers do not use it, "
           "as in webui.",
    "s_churn": "Refused unless 0.", "s_tmax": "Refused unless 0.", "s_tmin": "Refused unless 0.",
    "s_noise": "Refused unless 1.",
    "override_settings": "Only sd_model_checkpoint (and CLIP_stop_at_last_layers 1).",
    "script_name": "Refused when set (no scripts).", "script_args": "Unused without a script.",
    "send_images": "False: the answer has no images.",
    "alwayson_scripts": "ControlNet units (`{\"ControlNet\": {\"args\": [unit, …]}}`); "
                        "any other enabled script is refused.",
    "denoising_strength": "img2img: how much is redrawn (default 0.75).",
    "enable_hr": "Hires fix: refused when true.",
    "firstphase_width": "Hires fix: refused when over 0.",
    "firstphase_height": "Hires fix: refused when over 0.",
    "init_images": "img2img: one image, base64 or a data URL.",
    "resize_mode": "0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize.",
    "mask": "Inpainting: white repaints (base64 or a data URL).",
    "mask_blur": "Feather of the mask's edge, px.",
    "inpainting_fill": "Masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing.",
    "inpaint_full_res": "Only masked: the masked region repainted at full size, pasted back.",
    "inpaint_full_res_padding": "Only masked: pixels around the mask's box.",
    "inpainting_mask_invert": "1: repaint the black area instead.",
    "initial_noise_multiplier": "Only 1.",
}


def _describe(schema: dict[str, Any]) -> None:
    for name, prop in schema.get("properties", {}).items():
        prop.setdefault("description", _DOCS.get(name, "As in webui."))


class _Request(RequestModel):
    """webui's request fields Loomis reads or checks; unknown fields are webui's own extras,
    and the legacy ones webui itself ignores."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_describe, allow_inf_nan=False)

    prompt: Annotated[str, MULTILINE] = ""
    negative_prompt: Annotated[str, MULTILINE] = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = 0
    seed_resize_from_w: int = 0
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(default=1, ge=1, le=64)
    n_iter: int = Field(default=1, ge=1, le=64)
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = False
    tiling: bool | None = False
    eta: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] | None = None
    send_images: bool = True
    # base64 images may come in MIME lines (base64.encodebytes), as webui accepts them
    alwayson_scripts: Annotated[dict[str, Any] | None, MULTILINE] = None
    denoising_strength: float | None = None


class Txt2ImgRequest(_Request):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0


class Img2ImgRequest(_Request):
    init_images: Annotated[list[str] | None, MULTILINE] = None
    resize_mode: int = 0
    mask: Annotated[str | None, MULTILINE] = None
    mask_blur: int | None = Field(default=4, ge=0, le=256)
    inpainting_fill: int = 0
    inpaint_full_res: bool | int = True
    inpaint_full_res_padding: int = Field(default=0, ge=0, le=2048)
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None


class GenerationAnswer(BaseModel):
    images: list[str] = Field(description="Raw base64 PNGs, with webui's `parameters` text.")
    parameters: dict[str, Any] = Field(description="The request, as webui echoes it.")
    info: str = Field(description="A JSON string: seed, all_seeds, prompt, infotexts, …")


# webui request fields that would change the image, with the values that change nothing
_EXTRAS_THAT_CHANGE_THE_RESULT: dict[str, tuple[Any, ...]] = {
    "refiner_checkpoint": (None, ""), "refiner_switch_at": (None, 0, 0.0),
    "s_min_uncond": (None, 0, 0.0), "infotext": (None, ""), "latent_mask": (None, ""),
    "hr_checkpoint_name": (None, ""), "image_cfg_scale": (None, 1.5, 0, 1.5),
    "sampler_noise_scheduler_override": (None,),
}


def _refuse_unhonoured(body: _Request) -> None:
    """What would change the result and Loomis does not do: a 400 naming it."""
    errors = []

    def refuse(field: str, message: str) -> None:
        errors.append({"field": field, "message": message})

    if isinstance(body, Txt2ImgRequest) and body.enable_hr:
        refuse("enable_hr", "hires fix is not supported; generate at the size you want, or "
               "img2img the result at a larger size")
    if isinstance(body, Txt2ImgRequest) and (body.firstphase_width or body.firstphase_height):
        refuse("firstphase_width", "first-phase sizes belong to hires fix (not supported)")
    if body.restore_faces:
        refuse("restore_faces", "face restoration is not supported")
    if body.tiling:
        refuse("tiling", "seamless tiling is not supported")
    if body.styles:
        refuse("styles", "saved prompt styles do not exist here; put their text in the prompt")
    if body.subseed_strength:
        refuse("subseed_strength", "variation seeds are not supported")
    if body.seed_resize_from_h > 0 or body.seed_resize_from_w > 0:
        refuse("seed_resize_from_w", "seed resizing is not supported")
    if body.script_name:
        refuse("script_name", f"script {body.script_name!r} is not available (no scripts)")
    for name, default in (("s_churn", 0), ("s_tmax", 0), ("s_tmin", 0), ("s_noise", 1)):
        value = getattr(body, name)
        if value is not None and value != default:
            refuse(name, "sampler noise settings are not supported")
    for key, value in (body.override_settings or {}).items():
        if key == "sd_model_checkpoint":
            continue
        if key == "CLIP_stop_at_last_layers" and value in (1, None):
            continue
        refuse(f"override_settings.{key}", "only sd_model_checkpoint can be overridden")
    for key, script in (body.alwayson_scripts or {}).items():
        if key.lower() == "controlnet":
            continue
        args = script.get("args") if isinstance(script, dict) else "?"
        if args is None or args == [] or (isinstance(args, list) and len(args) == 1
                                          and args[0] is False):
            continue  # a disabled extension, as webuiapi sends one it found
        refuse(f"alwayson_scripts.{key}", "not available here (only ControlNet)")
    extras = body.model_extra or {}
    for key, harmless in _EXTRAS_THAT_CHANGE_THE_RESULT.items():
        if key in extras and extras[key] not in harmless:
            refuse(key, "not supported here")
    if isinstance(body, Img2ImgRequest):
        if body.initial_noise_multiplier not in (None, 1, 1.0):
            refuse("initial_noise_multiplier", "only 1 is supported")
        if body.init_images and len(body.init_images) > 1:
            refuse("init_images", "send one init image (a batch uses it for every image)")
        if body.resize_mode not in RESIZE_MODES:
            refuse("resize_mode", "0 just resize, 1 crop and resize, 2 resize and fill, "
                   "3 just resize (latent upscale)")
    if errors:
        error = ValidationFailed(errors)
        error.status = 400
        raise error


async def _model(state: GatewayState, session: Any, who: Caller, body: _Request) -> ModelPreset:
    name = (body.override_settings or {}).get("sd_model_checkpoint")
    field = "override_settings.sd_model_checkpoint"
    if name is not None and not isinstance(name, str):
        raise invalid(field, "expected a model title or name")
    if not name:
        option = await session.get(CompatOption, who.key)
        name = (option.options if option else {}).get("sd_model_checkpoint")
        field = "sd_model_checkpoint"
    preset = _preset_named(state, name) if name else state.registry.get(
        state.settings.generator.default_model)
    if preset is None:
        raise invalid(field, f"no model {name!r}; GET /sdapi/v1/sd-models lists them")
    return preset


def _preset_named(state: GatewayState, name: str) -> ModelPreset | None:
    """A webui title (`name.safetensors [hash]`), a model name or a preset name."""
    bare = name.split(" [", 1)[0].strip()
    for suffix in (".safetensors", ".ckpt"):
        bare = bare.removesuffix(suffix)
    bare = bare.rsplit("/", 1)[-1]
    return state.registry.get(bare) or next(
        (preset for preset in state.registry if preset.name.lower() == bare.lower()), None)


async def _loras(session: Any, tenant: Tenant, tags: list[tuple[str, float]]) -> list[LoraUse]:
    uses: list[LoraUse] = []
    for name, weight in tags:
        rows = list(await session.scalars(select(Lora).where(Lora.tenant_id == tenant.id,
                                                             Lora.name == name)))
        if not rows:
            rows = [row for row in await session.scalars(select(Lora).where(
                Lora.tenant_id == tenant.id)) if row.name.lower() == name.lower()]
        if not rows:
            raise invalid("prompt", f"<lora:{name}:…>: you have no LoRA named {name!r} "
                          "(GET /sdapi/v1/loras)")
        if any(use.id == rows[0].id for use in uses):
            raise invalid("prompt", f"<lora:{name}:…> appears twice")
        try:
            uses.append(LoraUse(id=rows[0].id, weight=weight))
        except PydanticValidationError as exc:
            raise invalid("prompt", f"<lora:{name}:{weight}>: the weight must be a number "
                          "from -4 to 4") from exc
    return uses


def _control_units(body: _Request, size: tuple[int, int]) -> list[ControlSpec]:
    named = [key for key in (body.alwayson_scripts or {}) if key.lower() == "controlnet"]
    if len(named) > 1:
        raise invalid(f"alwayson_scripts.{named[1]}", "ControlNet is given twice")
    script = (body.alwayson_scripts or {}).get(named[0]) if named else None
    if script is not None and not isinstance(script, dict):
        raise invalid(f"alwayson_scripts.{named[0]}", "expected {\"args\": [units]}")
    units = (script or {}).get("args") or []
    if not isinstance(units, list):
        raise invalid(f"alwayson_scripts.{named[0]}.args", "expected a list of units")
    controls: list[ControlSpec] = []
    for index, unit in enumerate(units):
        field = f"alwayson_scripts.ControlNet.args.{index}"
        if not isinstance(unit, dict):
            raise invalid(field, "a ControlNet unit is an object")
        if not _flag(unit.get("enabled"), f"{field}.enabled", True):
            continue
        controls.append(_control(unit, field, size))
    return controls


def _at(field: str, key: str) -> str:
    return key if field == "body" else f"{field}.{key}"


def _number(unit: dict[str, Any], key: str, default: float, field: str) -> float:
    value = unit.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise invalid(_at(field, key), "expected a number")
    try:
        number = float(value)
    except ValueError as exc:
        raise invalid(_at(field, key), "expected a number") from exc
    if number != number or number in (float("inf"), float("-inf")):
        raise invalid(_at(field, key), "expected a finite number")
    return number


def _flag(value: Any, field: str, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise invalid(field, "expected true or false")


def _resize_mode(value: Any, field: str) -> str:
    key = value.lower() if isinstance(value, str) else value
    mode = RESIZE_MODES.get(key) if isinstance(key, int | str) and not isinstance(
        key, bool) else None
    if mode is None:
        raise invalid(field, "Just Resize, Crop and Resize or Resize and Fill (or 0, 1, 2)")
    return mode


def _processor_size(image: Image.Image, res: int, field: str, *,
                    multiple: int = 1) -> tuple[int, int]:
    """The image's size with its short side at ``res``, as webui's preprocessors run. A thin
    image's long side grows by the same factor: the size is checked before any pixel is made
    (a 8x2048 image at 4096 would be a 4096x1048576 map, gigabytes in the gateway)."""
    scale = res / min(image.size)
    size = (max(8, round(image.width * scale)) // multiple * multiple,
            max(8, round(image.height * scale)) // multiple * multiple)
    if size[0] * size[1] > MAX_INPUT_PIXELS:
        raise invalid(field, f"{res} px on the short side makes the {image.width}x"
                      f"{image.height} image {size[0]}x{size[1]}; at most {MAX_INPUT_PIXELS} "
                      "pixels (lower processor_res, or send a less elongated image)")
    return size


def _control(unit: dict[str, Any], field: str, size: tuple[int, int]) -> ControlSpec:
    module = str(unit.get("module") or "none").lower()
    if module not in MODULES:
        raise invalid(f"{field}.module", f"preprocessor {module!r} is not available; use one "
                      f"of {', '.join(MODULES)}")
    model = str(unit.get("model") or "None")
    kind = MODULES[module]
    named = next((c for c in ControlType if c.value in model.lower()), None)
    if model not in ("None", "none", "") and named is None:
        raise invalid(f"{field}.model", f"no ControlNet {model!r}; GET /controlnet/model_list")
    if kind is not None and named is not None and kind != named:
        raise invalid(f"{field}.model", f"a {named.value} model cannot take the {module} "
                      "preprocessor's map here")
    control_type = named or kind
    if control_type is None:
        raise invalid(f"{field}.model", "name a ControlNet model (or a preprocessor)")
    mode = unit.get("control_mode", "Balanced")
    if mode not in ("Balanced", 0, "0", None):
        raise invalid(f"{field}.control_mode", "only Balanced is supported")
    for key in ("mask", "mask_image"):
        if unit.get(key):
            raise invalid(f"{field}.{key}", "unit masks are not supported")
    if unit.get("advanced_weighting"):
        raise invalid(f"{field}.advanced_weighting", "not supported")
    source = unit.get("image") or unit.get("input_image")
    if isinstance(source, dict):
        if source.get("mask"):
            raise invalid(f"{field}.image.mask", "unit masks are not supported")
        source = source.get("image")
    if isinstance(source, list):
        raise invalid(f"{field}.image", "one image per unit")
    image = image_of(source, field=f"{field}.image")
    resize = _resize_mode(unit.get("resize_mode") or "just resize", f"{field}.resize_mode")
    image = fit(image, size, resize)
    res = int(_number(unit, "processor_res", -1, field))
    if res > 4096:
        raise invalid(f"{field}.processor_res", "at most 4096")
    pixel_perfect = _flag(unit.get("pixel_perfect"), f"{field}.pixel_perfect", False)
    if kind is not None and not pixel_perfect and res > 0:
        # the preprocessor runs at processor_res (its short side), as webui's does
        image = image.resize(_processor_size(image, res, f"{field}.processor_res"),
                             Image.Resampling.LANCZOS)
    low, high = 100, 200
    if control_type is ControlType.CANNY and kind is not None:
        a, b = _number(unit, "threshold_a", -1, field), _number(unit, "threshold_b", -1, field)
        low = int(a) if a != -1 else 100
        high = int(b) if b != -1 else 200
    try:
        return ControlSpec(type=control_type, image=data_url(image), preprocess=kind is not None,
                           scale=_number(unit, "weight", 1.0, field),
                           start=_number(unit, "guidance_start", 0.0, field),
                           end=_number(unit, "guidance_end", 1.0, field),
                           low_threshold=low, high_threshold=high)
    except PydanticValidationError as exc:
        names = {"scale": "weight", "start": "guidance_start", "end": "guidance_end",
                 "low_threshold": "threshold_a", "high_threshold": "threshold_b"}
        error = ValidationFailed([{"field": f"{field}." + names.get(
            str(e["loc"][0]) if e["loc"] else "", str(e["loc"][0]) if e["loc"] else "unit"),
            "message": e["msg"]} for e in exc.errors()])
        error.status = 400
        raise error from exc


async def _generate(request: Request, body: _Request, *, img2img: bool, session: Any,
                    state: GatewayState, who: Caller) -> GenerationAnswer:
    _refuse_unhonoured(body)
    preset = await _model(state, session, who, body)
    # before any image is fitted to width x height: a size of 0 or less made Pillow raise (a
    # 500), and a huge one was allocated before the spec refused it
    limits = preset.limits
    bad = [{"field": name, "message": f"{preset.name} supports {limits.min_size}-"
            f"{limits.max_size} px"} for name, value in (("width", body.width),
                                                          ("height", body.height))
           if not limits.min_size <= value <= limits.max_size]
    if bad:
        error = ValidationFailed(bad)
        error.status = 400
        raise error
    prompt, tags = lora_tags(body.prompt)
    if _flag((body.model_extra or {}).get("disable_extra_networks"), "disable_extra_networks",
             False):
        tags = []  # webui: the <lora:…> tags are taken out of the prompt and not applied
    loras = await _loras(session, who.tenant, tags)
    sampler = body.sampler_name or body.sampler_index
    if not sampler and body.scheduler and body.scheduler.lower() != "automatic":
        raise invalid("scheduler", "a schedule type needs its sampler_name")
    scheduler = loomis_scheduler(sampler, body.scheduler, field="sampler_name")
    if preset.family == ModelFamily.FLUX and scheduler in ("Euler", "Euler a"):
        scheduler = "FlowMatch Euler"  # what Forge and ComfyUI run Flux with for "Euler"
    size = (body.width, body.height)
    fields: dict[str, Any] = {
        "prompt": prompt, "negative_prompt": body.negative_prompt, "model": preset.name,
        "width": body.width, "height": body.height, "steps": body.steps,
        "guidance_scale": body.cfg_scale, "seed": None if body.seed < 0 else body.seed,
        "scheduler": scheduler, "loras": loras, "controls": _control_units(body, size)}
    # webui reads eta in DDIM (η) and in the ancestral samplers (their noise, 1 = as they are
    # built here); the other samplers never read it, in webui as here. webuiapi sends 1.
    if body.eta is not None and scheduler == "DDIM":
        fields["eta"] = body.eta
    elif body.eta not in (None, 1) and scheduler in ("Euler a", "DPM2 a"):
        raise invalid("eta", f"{sampler} runs with eta 1 only (its full ancestral noise)")
    crop = None
    init = None
    if img2img:
        assert isinstance(body, Img2ImgRequest)
        if not body.init_images:
            raise invalid("init_images", "img2img needs an init image")
        resize = RESIZE_MODES[body.resize_mode]
        # webui fits the init image (and mask) to width x height first: the answer has that size
        init = fit(image_of(body.init_images[0], field="init_images.0"), size, resize)
        fields.update(mode=GenerationMode.IMG2IMG, strength=body.denoising_strength
                      if body.denoising_strength is not None else 0.75)
        if body.mask:
            mask = webui_mask(image_of(body.mask, field="mask", mode="RGBA"),
                              invert=bool(body.inpainting_mask_invert))
            mask = fit(mask, size, resize).point(lambda v: 255 if v > 127 else 0)
            if mask.getbbox() is None:
                raise invalid("mask", "the mask repaints nothing (white repaints)")
            noise_seed = body.seed if body.seed >= 0 else secrets.randbelow(2**31)
            init_filled = prefill(init, mask, body.inpainting_fill, seed=noise_seed)
            if body.inpaint_full_res:
                region = masked_region(mask, body.inpaint_full_res_padding
                                       + (body.mask_blur or 0), size)
                blurred = mask.filter(ImageFilter.GaussianBlur(body.mask_blur or 0))
                crop = (region.box, blurred.crop(region.box))
                work_mask = mask.crop(region.box).resize(size, Image.Resampling.LANCZOS)
                work_init = init_filled.crop(region.box).resize(size, Image.Resampling.LANCZOS)
            else:
                work_init = fit(init_filled, size, resize)
                work_mask = fit(mask, size, resize)
            fields.update(mode=GenerationMode.INPAINT, init_image=data_url(work_init),
                          mask=MaskSpec(image=data_url(work_mask),
                                        feather=float(body.mask_blur or 0)))
        else:
            fields["init_image"] = data_url(fit(init, size, resize))
    total = body.batch_size * body.n_iter
    if total > MAX_IMAGES:
        raise invalid("batch_size", f"batch_size x n_iter is {total} images; at most "
                      f"{MAX_IMAGES} per request")
    try:
        spec = GenerationSpec.model_validate(fields)
    except PydanticValidationError as exc:
        error = ValidationFailed([{"field": _WEBUI_FIELDS.get(str(e["loc"][0]), str(e["loc"][0]))
                                   if e["loc"] else "body", "message": e["msg"]}
                                  for e in exc.errors()])
        error.status = 400
        raise error from exc
    outcome = await jobs.run(session=session, state=state, tenant=who.tenant, spec=spec,
                             total=total, origin={"api": "a1111.img2img" if img2img
                                                  else "a1111.txt2img", "key": who.key[:16]},
                             canceled_ok=True)  # interrupt/skip: a 200 with what was made
    return _answer(body, outcome, preset=preset, crop=crop, init=init)


def _answer(body: _Request, outcome: jobs.Outcome, *, preset: ModelPreset,
            crop: Any, init: Image.Image | None) -> GenerationAnswer:
    spec = outcome.jobs[0].spec if outcome.jobs else {
        "prompt": body.prompt, "negative_prompt": body.negative_prompt, "width": body.width,
        "height": body.height, "steps": body.steps, "guidance_scale": body.cfg_scale,
        "scheduler": None, "strength": body.denoising_strength}
    images, infotexts, seeds = [], [], []
    for image in outcome.images:
        with Image.open(io.BytesIO(image.png)) as opened:
            text = str(opened.info.get("parameters", ""))
            png = image.png
            if crop is not None and init is not None:  # "only masked": back into the photo
                png = _paste_back(opened.convert("RGB"), init, crop, text)
        infotexts.append(text)
        seeds.append(image.seed if image.seed is not None else 0)
        images.append(base64.b64encode(png).decode() if body.send_images else None)
    sampler, schedule = webui_sampler(str(spec.get("scheduler") or "")) if spec.get(
        "scheduler") else (body.sampler_name or body.sampler_index or "", "Automatic")
    info = {
        "prompt": spec.get("prompt"), "all_prompts": [spec.get("prompt")] * len(seeds),
        "negative_prompt": spec.get("negative_prompt", ""),
        "all_negative_prompts": [spec.get("negative_prompt", "")] * len(seeds),
        "seed": seeds[0] if seeds else -1, "all_seeds": seeds, "subseed": -1,
        "all_subseeds": [-1] * len(seeds), "subseed_strength": 0,
        "width": spec.get("width"), "height": spec.get("height"), "sampler_name": sampler,
        "cfg_scale": spec.get("guidance_scale"), "steps": spec.get("steps"),
        "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": preset.name, "sd_model_hash": None, "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": spec.get("strength"),
        "extra_generation_params": {"Schedule type": schedule, **(
            {"Eta DDIM": spec["eta"]} if spec.get("eta") else {})},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": datetime.now(UTC).strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": "loomis",
        "loomis_job_ids": [job.id for job in outcome.jobs] + outcome.canceled,
        "interrupted": bool(outcome.canceled)}
    # the images sent are not echoed back (webui leaves them out unless include_init_images)
    parameters = {**body.model_dump(exclude=set(body.model_extra or {})),
                  **({"init_images": None, "mask": None}
                     if isinstance(body, Img2ImgRequest) else {})}
    return GenerationAnswer(images=[i for i in images if i is not None],
                            parameters=parameters, info=json.dumps(info))


def _paste_back(generated: Image.Image, init: Image.Image,
                crop: tuple[tuple[int, int, int, int], Image.Image], text: str) -> bytes:
    """The repainted region back into the photo through its (blurred) mask, as webui
    overlays it: pixels the mask does not touch are the photo's."""
    (x0, y0, x1, y1), mask = crop
    patch = generated.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS)
    out = init.copy()
    out.paste(patch, (x0, y0), mask)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    out.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@router.post("/txt2img", response_model=GenerationAnswer, summary="txt2img (AUTOMATIC1111 API)")
async def txt2img(request: Request, body: Txt2ImgRequest, session: SessionDep, state: StateDep,
                  who: CallerDep) -> GenerationAnswer:
    """webui's txt2img as Loomis generation jobs (`<lora:name:weight>` in the prompt, ControlNet
    units in `alwayson_scripts`); `batch_size` x `n_iter` images, image i with seed + i."""
    return await _generate(request, body, img2img=False, session=session, state=state, who=who)


@router.post("/img2img", response_model=GenerationAnswer, summary="img2img (AUTOMATIC1111 API)")
async def img2img(request: Request, body: Img2ImgRequest, session: SessionDep, state: StateDep,
                  who: CallerDep) -> GenerationAnswer:
    """img2img, and inpainting with `mask` (white repaints): `mask_blur` feathers,
    `inpainting_mask_invert`, `inpainting_fill` (0 fill, 1 original, 2 latent noise, 3 latent
    nothing, done on the pixels), `inpaint_full_res` repaints the masked region at full size
    and pastes it back. Unmasked pixels are kept exactly."""
    return await _generate(request, body, img2img=True, session=session, state=state, who=who)


def _title(preset: ModelPreset) -> str:
    return preset.name


@router.get("/sd-models", summary="Models (AUTOMATIC1111 API)")
async def sd_models(state: StateDep, who: CallerDep) -> list[dict[str, Any]]:
    return [{"title": _title(p), "model_name": p.name, "hash": None, "sha256": None,
             "filename": p.source, "config": None} for p in state.registry]


@router.get("/samplers", summary="Samplers (AUTOMATIC1111 API)")
async def samplers(who: CallerDep) -> list[dict[str, Any]]:
    return [{"name": name, "aliases": SAMPLER_ALIASES.get(name, []), "options": {}}
            for name in SAMPLERS]


@router.get("/schedulers", summary="Schedule types (AUTOMATIC1111 API)")
async def schedulers(who: CallerDep) -> list[dict[str, Any]]:
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1,
             "need_inner_model": False} for name, label in SCHEDULE_TYPES.items()]


@router.get("/loras", summary="Your LoRAs (AUTOMATIC1111 API)")
async def loras(session: SessionDep, who: CallerDep) -> list[dict[str, Any]]:
    rows = await session.scalars(select(Lora).where(Lora.tenant_id == who.tenant.id)
                                 .order_by(Lora.name))
    return [{"name": row.name, "alias": row.name, "path": f"loomis://loras/{row.id}",
             "metadata": {"id": row.id, "base_model": row.base_model, "sha256": row.sha256}}
            for row in rows]


@router.get("/options", summary="Options (AUTOMATIC1111 API)")
async def get_options(session: SessionDep, state: StateDep, who: CallerDep) -> dict[str, Any]:
    option = await session.get(CompatOption, who.key)
    model = (option.options if option else {}).get("sd_model_checkpoint") \
        or state.settings.generator.default_model
    return {"sd_model_checkpoint": model, "sd_checkpoint_hash": None, "samples_format": "png",
            "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"}


@router.post("/options", summary="Set options (AUTOMATIC1111 API)")
async def set_options(body: Annotated[dict[str, Any], Body()], session: SessionDep,
                      state: StateDep, who: CallerDep) -> None:
    """Only `sd_model_checkpoint` (a title, model name or preset): the key's default model."""
    unknown = [key for key in body if key != "sd_model_checkpoint"]
    if unknown:
        raise invalid(unknown[0], "only sd_model_checkpoint can be set")
    name = body.get("sd_model_checkpoint")
    preset = _preset_named(state, str(name)) if name else None
    if preset is None:
        raise invalid("sd_model_checkpoint", f"no model {name!r}; GET /sdapi/v1/sd-models")
    option = await session.get(CompatOption, who.key)
    if option is None:
        option = CompatOption(key_hash=who.key, tenant_id=who.tenant.id, options={})
        session.add(option)
    option.options = {**option.options, "sd_model_checkpoint": preset.name}
    async with state.write_lock:
        await session.commit()


async def _active(session: Any, who: Caller) -> list[Job]:
    rows = await session.scalars(select(Job).where(
        Job.tenant_id == who.tenant.id, Job.status.in_(("queued", "running")))
        .order_by(Job.created_at))
    return [job for job in rows if (job.spec or {}).get("compat", {}).get("key") == who.key[:16]]


@router.get("/progress", summary="Progress of your running request (AUTOMATIC1111 API)")
async def progress(session: SessionDep, who: CallerDep,
                   skip_current_image: bool = False) -> dict[str, Any]:
    active = await _active(session, who)
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
             "job_count": len(active), "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
             "sampling_steps": 0}
    if not active:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                "textinfo": None}
    job = next((j for j in active if j.status == "running"), active[0])
    event = await session.scalar(select(JobEventRow).where(
        JobEventRow.job_id == job.id, JobEventRow.type == "progress")
        .order_by(JobEventRow.seq.desc()).limit(1))
    data = event.data if event is not None else {}
    fraction = float(job.progress or 0.0)
    elapsed = ((datetime.now(UTC) - job.started_at).total_seconds()
               if job.started_at else 0.0)
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    state.update(job=f"job {job.id}", sampling_step=int(data.get("step", 0)),
                 sampling_steps=int(data.get("total_steps", job.spec.get("steps", 0))),
                 job_timestamp=job.created_at.strftime("%Y%m%d%H%M%S"))
    return {"progress": max(fraction, 0.01), "eta_relative": eta, "state": state,
            "current_image": None, "textinfo": f"Loomis job {job.id}: {job.status}"}


async def _cancel(session: SessionDep, state: GatewayState, who: Caller, *, all_jobs: bool) -> int:
    active = await _active(session, who)
    running = [job for job in active if job.status == "running"] or active[:1]
    canceled = 0
    for job in active if all_jobs else running[:1]:
        try:
            async with state.write_lock:
                await cancel_job(session=session, events=state.events, tenant=who.tenant,
                                 job_id=job.id)
            canceled += 1
        except Conflict:
            continue
    return canceled


@router.post("/interrupt", summary="Cancel your requests (AUTOMATIC1111 API)")
async def interrupt(session: SessionDep, state: StateDep, who: CallerDep) -> dict[str, Any]:
    """Cancels every queued and running job of this key's requests."""
    await _cancel(session, state, who, all_jobs=True)
    return {}


@router.post("/skip", summary="Cancel your running request (AUTOMATIC1111 API)")
async def skip(session: SessionDep, state: StateDep, who: CallerDep) -> None:
    """Cancels the running job of this key's requests (the rest go on)."""
    await _cancel(session, state, who, all_jobs=False)


class PngInfoRequest(RequestModel):
    image: Annotated[str, MULTILINE] = Field(description="A PNG as base64 or a data URL.")


@router.post("/png-info", summary="Read a PNG's generation parameters (AUTOMATIC1111 API)")
async def png_info(body: PngInfoRequest, who: CallerDep) -> dict[str, Any]:
    image = image_of(body.image, field="image", mode="RGBA")
    del image
    raw = base64.b64decode(body.image.split(",", 1)[-1], validate=False)
    with Image.open(io.BytesIO(raw)) as opened:
        text = {str(k): str(v) for k, v in opened.info.items() if isinstance(v, str)}
    info = text.pop("parameters", "")
    return {"info": info, "items": text, "parameters": infotext(info) if info else {}}


@router.get("/scripts", summary="Scripts (AUTOMATIC1111 API)")
async def scripts(who: CallerDep) -> dict[str, list[str]]:
    """Only ControlNet, as webui's extension names itself (`controlnet m2m` tells webuiapi the
    extension is there, which makes it send `{"args": []}` when a call has no units)."""
    names = ["controlnet", "controlnet m2m"]
    return {"txt2img": names, "img2img": names}


@router.get("/cmd-flags", summary="Server flags (AUTOMATIC1111 API)")
async def cmd_flags(who: CallerDep) -> dict[str, Any]:
    return {"api": True, "nowebui": True, "listen": True, "api_auth": "(API keys)",
            "ckpt_dir": None, "lora_dir": None, "server": "loomis"}


@router.get("/memory", summary="Memory (AUTOMATIC1111 API)")
async def memory(who: CallerDep) -> dict[str, Any]:
    """The gateway's own RAM; GPUs belong to the workers, which report nothing here."""
    try:
        pages, free_pages = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
        ram: dict[str, Any] = {"total": pages * size, "free": free_pages * size,
                               "used": (pages - free_pages) * size}
    except (ValueError, OSError):
        ram = {"error": "unavailable"}
    return {"ram": ram, "cuda": {"error": "the gateway has no GPU; workers own them"}}


@controlnet_router.get("/version", summary="ControlNet API version (AUTOMATIC1111 API)")
async def controlnet_version(who: CallerDep) -> dict[str, int]:
    return {"version": 2}


@controlnet_router.get("/model_list", summary="ControlNet models (AUTOMATIC1111 API)")
async def controlnet_models(session: SessionDep, state: StateDep,
                            who: CallerDep) -> dict[str, list[str]]:
    option = await session.get(CompatOption, who.key)
    name = (option.options if option else {}).get("sd_model_checkpoint")
    preset = (_preset_named(state, name) if name else None) or state.registry.get(
        state.settings.generator.default_model)
    return {"model_list": sorted(c.value for c in (preset.controlnets if preset else {}))}


@controlnet_router.get("/module_list", summary="ControlNet preprocessors (AUTOMATIC1111 API)")
async def controlnet_modules(who: CallerDep) -> dict[str, Any]:
    return {"module_list": list(MODULES), "module_detail": {
        name: {"model_free": False, "sliders": [] if name != "canny" else [
            {"name": "Low Threshold", "value": 100, "min": 1, "max": 255},
            {"name": "High Threshold", "value": 200, "min": 1, "max": 255}]}
        for name in MODULES}}


@controlnet_router.post("/detect", summary="Run a preprocessor (AUTOMATIC1111 API)")
async def controlnet_detect(body: Annotated[dict[str, Any], Body()], session: SessionDep,
                            state: StateDep, who: CallerDep) -> dict[str, Any]:
    """Takes `controlnet_input_images` (webuiapi sends `controlnet_images`: both work)."""
    from services.gateway.control.routes import preprocess
    from shared.specs import PreprocessSpec

    module = str(body.get("controlnet_module") or "none").lower()
    kind = MODULES.get(module)
    if kind is None:
        raise invalid("controlnet_module", f"preprocessor {module!r} is not available "
                      f"({', '.join(m for m in MODULES if m != 'none')})")
    sources = body.get("controlnet_input_images") or body.get("controlnet_images") or []
    if not sources:
        raise invalid("controlnet_input_images", "no image selected")
    if not isinstance(sources, list):
        raise invalid("controlnet_input_images", "expected a list of images")
    a = _number(body, "controlnet_threshold_a", -1, "body")
    b = _number(body, "controlnet_threshold_b", -1, "body")
    res = int(_number(body, "controlnet_processor_res", -1, "body"))
    if res > 4096:
        raise invalid("controlnet_processor_res", "at most 4096")
    images = []
    for index, source in enumerate(sources):
        image = image_of(source, field=f"controlnet_input_images.{index}")
        if res > 0:
            image = image.resize(_processor_size(image, res, "controlnet_processor_res",
                                                 multiple=8))
        try:
            spec = PreprocessSpec(
                type=kind, image=data_url(image),
                low_threshold=int(a) if kind is ControlType.CANNY and a != -1 else 100,
                high_threshold=int(b) if kind is ControlType.CANNY and b != -1 else 200)
        except PydanticValidationError as exc:
            names = {"low_threshold": "controlnet_threshold_a",
                     "high_threshold": "controlnet_threshold_b"}
            error = ValidationFailed([{"field": names.get(str(e["loc"][0]) if e["loc"] else "",
                                                          "controlnet_input_images"),
                                       "message": e["msg"]} for e in exc.errors()])
            error.status = 400
            raise error from exc
        response = await preprocess(spec, session, who.tenant, state)
        images.append(base64.b64encode(bytes(response.body)).decode())
    return {"images": images, "info": "Success"}


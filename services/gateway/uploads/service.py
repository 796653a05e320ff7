"""Input images: checked once at the gateway, stored as PNG, referenced by jobs.

Uploads are content-addressed under the tenant (``inputs/{tenant}/uploads/{sha}.png``), so
the same image sent twice is stored once and a reference can never point at another
tenant's file. Jobs never see client references: the gateway resolves each to the key of a
checked PNG and queues that.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFilter, ImageOps
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.db.models import Artifact, Job
from services.gateway.images import (
    CheckedImage,
    decode_data_url,
    decode_image,
    fit_mask,
    mask_is_empty,
    render_mask,
)
from shared.errors import NotFound, ValidationFailed
from shared.keys import upload_key
from shared.specs import GenerationMode, GenerationSpec
from shared.storage import ObjectStore

UPLOAD_PREFIX = "upload:"
JOB_PREFIX = "job:"


@dataclass(frozen=True)
class StoredImage:
    ref: str
    key: str
    image: Image.Image

    def describe(self) -> dict[str, Any]:
        return {"id": self.ref.removeprefix(UPLOAD_PREFIX), "ref": self.ref,
                "width": self.image.width, "height": self.image.height}


async def store_checked(*, store: ObjectStore, tenant_id: str, checked: CheckedImage) -> StoredImage:
    upload_id = hashlib.sha256(checked.png).hexdigest()[:32]
    key = upload_key(tenant_id, upload_id)
    await store.put(key, checked.png, content_type="image/png")
    return StoredImage(ref=f"{UPLOAD_PREFIX}{upload_id}", key=key, image=checked.image)


async def store_upload(
    *, store: ObjectStore, tenant_id: str, data: bytes, field: str, mode: str = "RGB",
) -> StoredImage:
    checked = decode_image(data, field=field, mode=mode)
    return await store_checked(store=store, tenant_id=tenant_id, checked=checked)


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed([{"field": field, "message": message}])


async def load_image_ref(
    *, session: AsyncSession, store: ObjectStore, tenant_id: str, ref: str, field: str,
    mode: str = "RGB",
) -> StoredImage:
    """Resolve an upload, an earlier job's output or inline data to a stored, checked PNG."""
    if ref.startswith(UPLOAD_PREFIX):
        upload_id = ref.removeprefix(UPLOAD_PREFIX)
        if not re.fullmatch(r"[0-9a-f]{32}", upload_id):
            raise _invalid(field, f"no upload {upload_id[:40]!r} (upload ids are 32 hex "
                           "characters, from POST /v1/uploads)")
        key = upload_key(tenant_id, upload_id)
        try:
            data = await store.get(key)
        except NotFound as exc:
            raise _invalid(field, f"no upload {upload_id!r} (upload images with "
                           "POST /v1/uploads)") from exc
    elif ref.startswith(JOB_PREFIX):
        job_id, _, index_text = ref.removeprefix(JOB_PREFIX).partition("/")
        if not re.fullmatch(r"[0-9a-f-]{36}", job_id) or not re.fullmatch(r"[0-9]{0,4}",
                                                                            index_text):
            raise _invalid(field, "expected job:<job_id>/<index>")
        job = await session.get(Job, job_id)
        if job is None or job.tenant_id != tenant_id:
            raise _invalid(field, f"no job {job_id!r}")
        index = int(index_text or 0)
        artifact = await session.scalar(select(Artifact).where(
            Artifact.job_id == job_id, Artifact.kind == "image", Artifact.index == index))
        if artifact is None:
            raise _invalid(field, f"job {job_id} has no output image {index} "
                           f"(it is {job.status})")
        data = await store.get(artifact.key)
    elif ref.startswith("data:") or len(ref) > 256:
        data = decode_data_url(ref, field=field)
    else:
        raise _invalid(field, "expected `upload:<id>`, `job:<job_id>/<index>` or a data: URL")
    return await store_upload(store=store, tenant_id=tenant_id, data=data, field=field, mode=mode)


async def resolve_inputs(
    *, session: AsyncSession, store: ObjectStore, tenant_id: str, spec: GenerationSpec,
) -> tuple[GenerationSpec, dict[str, str], tuple[int, int] | None]:
    """Check and store every image the spec names; returns (spec, inputs, init image size).

    The returned spec carries ``upload:`` references only (inline data is stored and
    replaced), so queued payloads stay small and manifests name reproducible inputs.
    """
    inputs: dict[str, str] = {}
    updates: dict[str, Any] = {}
    init: StoredImage | None = None
    if spec.init_image is not None:
        init = await load_image_ref(session=session, store=store, tenant_id=tenant_id,
                                    ref=spec.init_image, field="init_image")
        inputs["init_image"] = init.key
        updates["init_image"] = init.ref
    if spec.mode == GenerationMode.INPAINT and spec.mask is not None and init is not None:
        mask_spec = spec.mask
        if mask_spec.image is not None:
            loaded = await load_image_ref(session=session, store=store, tenant_id=tenant_id,
                                          ref=mask_spec.image, field="mask.image", mode="L")
            mask = fit_mask(loaded.image, size=init.image.size, field="mask.image")
            if mask_spec.feather or mask_spec.invert:
                if mask_spec.feather:
                    mask = mask.filter(ImageFilter.GaussianBlur(mask_spec.feather))
                if mask_spec.invert:
                    mask = ImageOps.invert(mask)
            field = "mask.image"
        else:
            shapes = [shape.model_dump() for shape in mask_spec.shapes or []]
            mask = render_mask(shapes, size=init.image.size, feather=mask_spec.feather,
                               invert=mask_spec.invert)
            field = "mask.shapes"
        if mask_is_empty(mask):
            raise _invalid(field, "the mask is empty (all black): nothing would be repainted")
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG")
        stored = await store_checked(store=store, tenant_id=tenant_id, checked=CheckedImage(
            image=mask, png=buffer.getvalue(), source_format="PNG"))
        inputs["mask"] = stored.key
        if mask_spec.image is not None:
            updates["mask"] = mask_spec.model_copy(update={"image": loaded.ref})
    controls = list(spec.controls)
    for index, control in enumerate(spec.controls):
        if control.image is None:
            continue
        stored = await load_image_ref(session=session, store=store, tenant_id=tenant_id,
                                      ref=control.image, field=f"controls.{index}.image")
        inputs[f"controls.{index}.image"] = stored.key
        controls[index] = control.model_copy(update={"image": stored.ref})
    if controls:
        updates["controls"] = controls
    resolved = spec.model_copy(update=updates) if updates else spec
    return resolved, inputs, (init.image.size if init is not None else None)

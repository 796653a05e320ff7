"""HTTP for input images."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.deps import SessionDep, StateDep, TenantDep
from services.gateway.images import MAX_INPUT_BYTES
from services.gateway.multipart import (
    FORM_OVERHEAD_BYTES,
    binary,
    multipart_body,
    parse_fields,
    read_multipart,
    too_large,
)
from services.gateway.problems import PROBLEM_RESPONSES
from services.gateway.uploads.service import store_upload
from shared.text import RequestModel

router = APIRouter(prefix="/v1/uploads", tags=["uploads"], responses=PROBLEM_RESPONSES)


class _NoFields(RequestModel):
    model_config = ConfigDict(extra="ignore")


class UploadOut(BaseModel):
    id: str = Field(description="The upload's id (a content hash).")
    ref: str = Field(description="Use this string wherever a spec takes an image.",
                     examples=["upload:3f2a9c0d1e7b4a56"])
    width: int = Field(description="Width in pixels.")
    height: int = Field(description="Height in pixels.")


@router.post(
    "", response_model=UploadOut, status_code=201, summary="Upload an input image",
    openapi_extra=multipart_body({"file": binary(
        f"PNG, JPEG or WebP; at most {MAX_INPUT_BYTES // 1024**2} MiB and 16 megapixels.")},
        required=["file"]),
)
async def upload_image(request: Request, session: SessionDep, tenant: TenantDep,
                       state: StateDep) -> UploadOut:
    """Store an image for img2img, inpainting masks or ControlNet. It is checked (a real image,
    not a decompression bomb) and re-encoded as PNG; the same bytes always give the same id."""
    await session.close()  # the key is checked: hold no pooled connection during the upload
    async with read_multipart(request, max_bytes=MAX_INPUT_BYTES + FORM_OVERHEAD_BYTES,
                              file_field="file") as form:
        parse_fields(_NoFields, form, files=("file",))
        part = form.files_of("file")[0]
        if part.size > MAX_INPUT_BYTES:
            raise too_large("file", f"larger than {MAX_INPUT_BYTES} bytes")
        data = await part.read()  # within the limit; decoding needs the pixels in memory anyway
    stored = await store_upload(store=state.store, tenant_id=tenant.id, data=data, field="file")
    return UploadOut(**stored.describe())

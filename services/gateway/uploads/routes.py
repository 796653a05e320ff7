"""HTTP for input images."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from pydantic import BaseModel, Field

from services.gateway.deps import StateDep, TenantDep
from services.gateway.problems import PROBLEM_RESPONSES
from services.gateway.uploads.service import store_upload
from shared.errors import ValidationFailed
from shared.images import MAX_INPUT_BYTES

router = APIRouter(prefix="/v1/uploads", tags=["uploads"], responses=PROBLEM_RESPONSES)


class UploadOut(BaseModel):
    id: str = Field(description="The upload's id (a content hash).")
    ref: str = Field(description="Use this string wherever a spec takes an image.",
                     examples=["upload:3f2a9c0d1e7b4a56"])
    width: int = Field(description="Width in pixels.")
    height: int = Field(description="Height in pixels.")


@router.post("", response_model=UploadOut, status_code=201, summary="Upload an input image")
async def upload_image(
    file: Annotated[UploadFile, File(description="PNG, JPEG or WebP; at most 16 megapixels.")],
    state: StateDep,
    tenant: TenantDep,
) -> UploadOut:
    """Store an image for img2img, inpainting masks or ControlNet. It is checked (a real image,
    not a decompression bomb) and re-encoded as PNG; the same bytes always give the same id."""
    data = await file.read(MAX_INPUT_BYTES + 1)
    if len(data) > MAX_INPUT_BYTES:
        error = ValidationFailed([{"field": "file", "message": "larger than "
                                   f"{MAX_INPUT_BYTES} bytes"}])
        error.status = 413
        raise error
    stored = await store_upload(store=state.store, tenant_id=tenant.id, data=data, field="file")
    return UploadOut(**stored.describe())

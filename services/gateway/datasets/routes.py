"""HTTP for datasets of training images."""

from __future__ import annotations

import contextlib
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import ConfigDict, Field

from services.gateway.datasets import service
from services.gateway.datasets.ingest import IngestLimits, Upload
from services.gateway.datasets.schemas import DatasetOut, DatasetPage, ItemOut, ItemPage, ItemPatch
from services.gateway.deps import SessionDep, StateDep, TenantDep
from services.gateway.multipart import (
    FORM_OVERHEAD_BYTES,
    multipart_body,
    parse_fields,
    read_multipart,
    too_large,
)
from services.gateway.problems import PROBLEM_RESPONSES
from shared.errors import ValidationFailed
from shared.text import RequestModel

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=PROBLEM_RESPONSES)


class DatasetUploadFields(RequestModel):
    """The text fields of a dataset upload; images, captions and zips travel beside them."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=100, description="The dataset's name.")
    caption_extension: str = Field(
        default=".caption", pattern=r"^\.[A-Za-z0-9_]{1,15}$",
        description="Caption file extension: read before `.caption` and `.txt`, and written by "
                    "the export and by tagging jobs.")
    min_side: int = Field(default=512, ge=64, le=4096, description="Training resolution; "
                          "smaller images are flagged in the report.")


_LIMITS = IngestLimits()
# Every part has a few hundred bytes of boundary and headers besides its data.
_BODY_LIMIT = _LIMITS.max_total_bytes + FORM_OVERHEAD_BYTES + 512 * _LIMITS.max_files


@router.post(
    "", response_model=DatasetOut, status_code=201, summary="Create a dataset",
    openapi_extra=multipart_body({
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "Images (png, jpg, webp, bmp) and caption files "
                  "(`name.caption`/`.txt` beside `name.png`); a filename may carry a kohya "
                  "folder, e.g. `10_sks dog/a.png`."},
        "zip": {"type": "array", "items": {"type": "string", "format": "binary"},
                "description": "Zip archives, e.g. a kohya `img/10_sks dog/…` + `reg/1_dog/…` "
                "tree."},
        **DatasetUploadFields.model_json_schema()["properties"],
    }, required=["name"]),
)
async def create_dataset(request: Request, session: SessionDep, tenant: TenantDep,
                         state: StateDep) -> DatasetOut:
    """Everything is checked before anything is stored: non-images, corrupt images,
    decompression bombs, zip-slip/absolute/symlink entries and archives over the limits are a
    4xx naming the entry. Duplicate images (same content) are kept once and reported. At most
    512 MiB of files (unpacked) and 10,000 files in one upload."""
    await session.close()  # an upload may take minutes: hold no pooled connection meanwhile
    async with read_multipart(request, max_bytes=_BODY_LIMIT, file_field="files",
                              max_files=_LIMITS.max_files) as form:
        fields = parse_fields(DatasetUploadFields, form)
        budget = _LIMITS.max_total_bytes
        for field_name in ("files", "zip"):
            for index, part in enumerate(form.files_of(field_name)):
                budget -= part.size
                if budget < 0:
                    raise too_large(f"{field_name}[{index}]",
                                    "the upload is larger than the dataset limit")
        with contextlib.ExitStack() as opened:
            def parts(field_name: str) -> list[tuple[str, Upload]]:
                return [(part.filename or f"{field_name}-{index}", opened.enter_context(part.open()))
                        for index, part in enumerate(form.files_of(field_name))]

            file_parts, zip_parts = parts("files"), parts("zip")
            if not file_parts and not zip_parts:
                raise ValidationFailed([{"field": "files",
                                         "message": "send image files and/or a zip"}])
            dataset, items = await service.create_dataset(
                session=session, store=state.store, tenant=tenant, name=fields.name,
                files=file_parts, zips=zip_parts, caption_extension=fields.caption_extension,
                min_side=fields.min_side)
    return service.dataset_out(dataset, items)


@router.get("", response_model=DatasetPage, summary="List datasets")
async def list_datasets(session: SessionDep, tenant: TenantDep) -> DatasetPage:
    from sqlalchemy import select

    from services.gateway.db.models import Dataset

    rows = list(await session.scalars(select(Dataset).where(Dataset.tenant_id == tenant.id)
                                      .order_by(Dataset.created_at.desc())))
    return DatasetPage(items=[service.dataset_out(d, await service.dataset_items(
        session=session, dataset=d)) for d in rows])


@router.get("/{dataset_id}", response_model=DatasetOut, summary="A dataset and its report")
async def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetOut:
    dataset = await service.get_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
    return service.dataset_out(dataset, await service.dataset_items(session=session, dataset=dataset))


@router.get("/{dataset_id}/items", response_model=ItemPage, summary="Page through a dataset's images")
async def list_items(
    dataset_id: str, session: SessionDep, tenant: TenantDep, state: StateDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50, cursor: str | None = None,
) -> ItemPage:
    dataset = await service.get_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
    return await service.page_items(session=session, store=state.store, dataset=dataset,
                                    limit=limit, cursor=cursor)


@router.patch("/{dataset_id}/items/{item_id}", response_model=ItemOut, summary="Edit a caption or tags")
async def patch_item(dataset_id: str, item_id: str, patch: ItemPatch, session: SessionDep,
                     tenant: TenantDep, state: StateDep) -> ItemOut:
    dataset = await service.get_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
    item = await service.patch_item(session=session, dataset=dataset, item_id=item_id, patch=patch)
    return service.item_out(item, store=state.store)


@router.get(
    "/{dataset_id}/export", summary="Download in kohya layout", response_class=Response,
    responses={200: {"content": {"application/zip": {}}, "description": "`img/<repeats>_<id> "
                     "<class>/` and `reg/…` folders with caption files, `metadata.json` "
                     "(kohya fine-tuning metadata) and `dataset_config.toml`."}},
)
async def export_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep,
                         state: StateDep) -> Response:
    dataset = await service.get_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
    data = await service.export_dataset(session=session, store=state.store, dataset=dataset)
    filename = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset.name) or "dataset"
    return Response(content=data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{filename}.zip"'})


@router.delete("/{dataset_id}", status_code=204, summary="Delete a dataset and its images")
async def delete_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep,
                         state: StateDep) -> Response:
    dataset = await service.get_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
    await service.delete_dataset(session=session, store=state.store, dataset=dataset)
    return Response(status_code=204)

"""HTTP for LoRA adapters."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile

from services.gateway.deps import SessionDep, StateDep, TenantDep
from services.gateway.loras import service
from services.gateway.loras.schemas import LoraOut, LoraPage
from services.gateway.problems import PROBLEM_RESPONSES
from shared.errors import ValidationFailed
from shared.text import SingleLineText

router = APIRouter(prefix="/v1/loras", tags=["loras"], responses=PROBLEM_RESPONSES)


@router.post("", response_model=LoraOut, status_code=201, summary="Upload a LoRA adapter")
async def upload_lora(
    file: Annotated[UploadFile, File(description="A .safetensors LoRA (diffusers/peft or kohya "
                                     "key names). Pickle files (.ckpt/.pt/.bin) are refused.")],
    base_model: Annotated[SingleLineText, Form(max_length=100, description="The preset it was trained for, "
                                    "e.g. `sd15`; the file is checked against it.")],
    session: SessionDep,
    tenant: TenantDep,
    state: StateDep,
    name: Annotated[SingleLineText | None, Form(
        max_length=100, description="Defaults to the file's name.")] = None,
) -> LoraOut:
    """Checks the file without loading it (safetensors header only): it must be a LoRA, and
    its layer widths must match `base_model`'s family. Use the returned `id` in a generation's
    `loras: [{id, weight}]`."""
    data = await file.read(service.MAX_LORA_BYTES + 1)
    if len(data) > service.MAX_LORA_BYTES:
        too_large = ValidationFailed([{"field": "file", "message": "the file is larger than 2 GiB"}])
        too_large.status = 413
        raise too_large
    lora = await service.create_lora(
        session=session, store=state.store, registry=state.registry, tenant=tenant,
        name=name or (file.filename or "lora").rsplit(".", 1)[0][:100], base_model=base_model,
        data=data,
    )
    return service.lora_out(lora)


@router.get("", response_model=LoraPage, summary="List LoRA adapters")
async def list_loras(
    session: SessionDep, tenant: TenantDep,
    family: Annotated[str | None, Query(description="sd15, sdxl or flux")] = None,
) -> LoraPage:
    loras = await service.list_loras(session=session, tenant=tenant, family=family)
    return LoraPage(items=[service.lora_out(lora) for lora in loras])


@router.get("/{lora_id}", response_model=LoraOut, summary="Get a LoRA adapter")
async def get_lora(lora_id: str, session: SessionDep, tenant: TenantDep) -> LoraOut:
    return service.lora_out(await service.get_lora(session=session, tenant=tenant, lora_id=lora_id))


@router.delete("/{lora_id}", status_code=204, summary="Delete a LoRA adapter")
async def delete_lora(lora_id: str, session: SessionDep, tenant: TenantDep,
                      state: StateDep) -> Response:
    await service.delete_lora(session=session, store=state.store, tenant=tenant, lora_id=lora_id)
    return Response(status_code=204)

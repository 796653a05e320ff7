"""HTTP for LoRA adapters."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import ConfigDict, Field, field_validator

from services.gateway.deps import SessionDep, StateDep, TenantDep
from services.gateway.loras import service
from services.gateway.loras.fit import lora_name_from_filename
from services.gateway.loras.schemas import LoraOut, LoraPage
from services.gateway.multipart import (
    FORM_OVERHEAD_BYTES,
    binary,
    multipart_body,
    parse_fields,
    read_multipart,
    too_large,
)
from services.gateway.problems import PROBLEM_RESPONSES
from services.gateway.subjects.forget import finish_lora_deletion, start_lora_deletion
from services.gateway.subjects.routes import DELETE_WAIT_S
from shared.errors import Conflict
from shared.specs import LoraName
from shared.text import RequestModel

router = APIRouter(prefix="/v1/loras", tags=["loras"], responses=PROBLEM_RESPONSES)


class LoraUploadFields(RequestModel):
    """The text fields of a LoRA upload; the file travels beside them as `file`."""

    model_config = ConfigDict(extra="ignore")

    base_model: str = Field(min_length=1, max_length=100, description="The preset it was "
                            "trained for, e.g. `sd15`; the file is checked against it.")
    name: LoraName | None = Field(default=None, description="Defaults to the file's name, "
                                  "made to fit the rule.")

    @field_validator("name", mode="before")
    @classmethod
    def _empty_is_absent(cls, value: object) -> object:
        return None if value == "" else value  # an HTML form sends its empty inputs


@router.post(
    "", response_model=LoraOut, status_code=201, summary="Upload a LoRA adapter",
    openapi_extra=multipart_body({
        "file": binary("A .safetensors LoRA (diffusers/peft or kohya key names), at most "
                       "2 GiB. Pickle files (.ckpt/.pt/.bin) are refused."),
        **LoraUploadFields.model_json_schema()["properties"],
    }, required=["file", "base_model"]),
)
async def upload_lora(request: Request, session: SessionDep, tenant: TenantDep,
                      state: StateDep) -> LoraOut:
    """Checks the file without loading it (safetensors header only): it must be a LoRA, and
    its layer widths must match `base_model`'s. Use the returned `id` in a generation's
    `loras: [{id, weight}]`. `name` follows the LoRA name rule; without one the file's name
    is used, with other characters replaced by `_`."""
    await session.close()  # an upload may take minutes: hold no pooled connection meanwhile
    async with read_multipart(request, max_bytes=service.MAX_LORA_BYTES + FORM_OVERHEAD_BYTES,
                              file_field="file") as form:
        fields = parse_fields(LoraUploadFields, form, files=("file",))
        part = form.files_of("file")[0]
        if part.size > service.MAX_LORA_BYTES:
            raise too_large("file", "the file is larger than 2 GiB")
        with part.open() as file:
            lora = await service.create_lora(
                session=session, store=state.store, registry=state.registry, tenant=tenant,
                name=fields.name or lora_name_from_filename(part.filename),
                base_model=fields.base_model, file=file,
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


@router.delete(
    "/{lora_id}", status_code=204, summary="Delete a LoRA adapter",
    responses={202: {"description": "Deletion under way (a job using the LoRA is still "
                     "stopping); it finishes on its own."}})
async def delete_lora(
    lora_id: str, session: SessionDep, tenant: TenantDep, state: StateDep,
    outputs: Annotated[bool, Query(description="Also delete every output made with it "
                                   "(images and manifests).")] = False,
) -> Response:
    """The LoRA is unusable at once (a generation naming it is a 422); jobs using it are
    canceled, its file removed from storage and from every worker's cache, and, with
    ``outputs=true``, every output made with it deleted. A subject's LoRA is deleted with its
    subject (`DELETE /v1/subjects/{id}`): 409 here."""
    lora = await service.get_lora(session=session, tenant=tenant, lora_id=lora_id)
    if lora.subject_id is not None:
        raise Conflict(f"LoRA {lora_id} belongs to subject {lora.subject_id}; delete the "
                       "subject (DELETE /v1/subjects/{id}) to forget both",
                       code="lora_of_subject")
    deletion_id = await start_lora_deletion(session=session, state=state, tenant=tenant,
                                            lora=lora, outputs=outputs)
    await session.close()
    deadline = asyncio.get_running_loop().time() + DELETE_WAIT_S
    while not await finish_lora_deletion(state, deletion_id):
        if asyncio.get_running_loop().time() > deadline:
            return Response(status_code=202)
        await asyncio.sleep(0.25)
    return Response(status_code=204)

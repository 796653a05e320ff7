"""LoRA adapters: checked without torch at upload, stored once, resolved for generations."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.db.models import Lora, Subject, Tenant, new_id, utcnow
from services.gateway.files.stores import GatewayStore
from services.gateway.loras.fit import check_lora_for_model, lora_name_from_filename, width_mismatch
from services.gateway.loras.inspection import LoraInfo, LoraRejected, inspect_lora
from services.gateway.loras.schemas import LoraOut
from shared.errors import NotFound, ValidationFailed
from shared.keys import lora_key, lora_prefix
from shared.models import ModelPreset, ModelRegistry
from shared.specs import LoraRef, LoraUse

MAX_LORA_BYTES = 2 * 1024**3


def lora_out(lora: Lora) -> LoraOut:
    return LoraOut(
        id=lora.id, name=lora.name, family=lora.family, base_model=lora.base_model,
        format=lora.format, rank=lora.rank, size=lora.size, sha256=lora.sha256,
        source=lora.source, info=lora.info, created_at=lora.created_at,
    )


def _invalid(field: str, message: str, *, code: str = "validation_error") -> ValidationFailed:
    error = ValidationFailed([{"field": field, "message": message}])
    error.code = code
    return error


async def create_lora(
    *, session: AsyncSession, store: GatewayStore, registry: ModelRegistry, tenant: Tenant,
    name: str, base_model: str, file: BinaryIO, source: str = "upload",
    info: LoraInfo | None = None,
) -> Lora:
    """Refuse anything but a safetensors LoRA that fits the base model, then store and record it.

    ``file`` is read for its header and hash and then streamed to storage, never held whole;
    ``info`` is what ``inspect_lora`` said of this very file, when the caller already asked.
    """
    preset = registry.get(base_model)
    if preset is None:
        raise _invalid("base_model", f"unknown model {base_model!r}; known: "
                       f"{', '.join(registry.names())}")
    try:
        if info is None:
            # Parsing a multi-GB header and hashing it is seconds of CPU: keep the loop free.
            info = await asyncio.to_thread(inspect_lora, file)
        check_lora_for_model(info, preset)
    except LoraRejected as exc:
        raise _invalid("file", str(exc), code=exc.code) from exc
    lora_id = new_id()
    key = lora_key(tenant.id, lora_id)
    await store.put_file(key, file, content_type="application/octet-stream")
    lora = Lora(
        id=lora_id, tenant_id=tenant.id, name=name, family=preset.family.value,
        base_model=preset.name, key=key, sha256=info.sha256, size=info.size,
        format=info.format, rank=info.rank,
        info=info.record(),
        source=source, created_at=utcnow(),
    )
    session.add(lora)
    try:
        await session.commit()
    except Exception:
        await store.delete_prefix(lora_prefix(tenant.id, lora_id))  # nothing half-registered
        raise
    return lora


async def get_lora(*, session: AsyncSession, tenant: Tenant, lora_id: str) -> Lora:
    lora = await session.scalar(select(Lora).where(Lora.id == lora_id, Lora.tenant_id == tenant.id))
    if lora is None:
        raise NotFound(f"LoRA {lora_id} not found", code="lora_not_found")
    return lora


async def list_loras(*, session: AsyncSession, tenant: Tenant, family: str | None) -> list[Lora]:
    query = select(Lora).where(Lora.tenant_id == tenant.id)
    if family:
        query = query.where(Lora.family == family)
    return list(await session.scalars(query.order_by(Lora.created_at.desc(), Lora.id)))


async def resolve_loras(
    *, session: AsyncSession, tenant: Tenant, uses: list[LoraUse], preset: ModelPreset,
) -> list[LoraRef]:
    """Each requested LoRA must be the tenant's, of the model's family and of its widths
    (an SD1.5 LoRA does not fit a fine-tune with other layer sizes): 422 now, not a failed
    job later."""
    family, model = preset.family.value, preset.name
    refs: list[LoraRef] = []
    errors = []
    for index, use in enumerate(uses):
        lora = await session.scalar(
            select(Lora).where(Lora.id == use.id, Lora.tenant_id == tenant.id))
        if lora is None:  # a subject's id stands for its LoRA
            subject = await session.scalar(select(Subject).where(
                Subject.id == use.id, Subject.tenant_id == tenant.id))
            if subject is not None and subject.status == "ready" and subject.lora_id:
                lora = await session.get(Lora, subject.lora_id)
            elif subject is not None:
                errors.append({"field": f"loras.{index}.id", "message": f"subject {use.id} is "
                               f"{subject.status}, not ready"})
                continue
        if lora is None:
            errors.append({"field": f"loras.{index}.id", "message": f"no LoRA {use.id!r}"})
            continue
        if lora.family != family:
            errors.append({"field": f"loras.{index}.id", "message": f"LoRA {lora.name!r} is for "
                           f"{lora.family} models; {model} is {family}"})
            continue
        dims = set(lora.info.get("dims") or [])
        if preset.lora_dim is not None and dims and preset.lora_dim not in dims:
            errors.append({"field": f"loras.{index}.id", "message": f"LoRA {lora.name!r} has "
                           f"layer width {sorted(dims)}; {model} needs {preset.lora_dim}"})
            continue
        # Recorded at upload (LoRAs from before it was have only ``dims``, checked above).
        mismatch = width_mismatch(lora.info.get("widths") or {}, preset)
        if mismatch is not None:
            errors.append({"field": f"loras.{index}.id", "message": f"LoRA {lora.name!r} "
                           f"(checked against {lora.base_model}) {mismatch}"})
            continue
        if lora.id in {ref.id for ref in refs}:  # once by its id, once by its subject's
            errors.append({"field": f"loras.{index}.id", "message": f"LoRA {lora.name!r} "
                           "appears twice in `loras` (a subject's id stands for its LoRA)"})
            continue
        refs.append(LoraRef(id=lora.id, name=lora.name, key=lora.key, sha256=lora.sha256,
                            weight=use.weight, subject_id=lora.subject_id))
    if errors:
        raise ValidationFailed(errors)
    return refs


@dataclass(frozen=True)
class ImportResult:
    """What happened to one file of an imported folder, for the operator's report."""

    file: str
    status: str  # imported, exists, refused
    message: str
    lora_id: str | None = None


def _reference_preset(registry: ModelRegistry, info: LoraInfo) -> ModelPreset | None:
    """The family's real model (sd15, sdxl, flux-dev) for a LoRA whose family its keys and
    widths tell; a webui LoRA folder mixes families and names no base model."""
    if info.family_hint is None:
        return None
    return next((preset for preset in registry if preset.family == info.family_hint
                 and preset.name in ("sd15", "sdxl", "flux-dev")), None)


async def import_lora_file(
    *, session: AsyncSession, store: GatewayStore, registry: ModelRegistry, tenant: Tenant,
    path: Path, base_model: str | None = None,
) -> ImportResult:
    """One file of a webui ``models/Lora`` folder, checked exactly as an upload is; a file
    the tenant already has (same SHA-256 and base model) is not stored twice."""
    try:
        opened = path.open("rb")
    except OSError as exc:  # unreadable, or gone since the folder was listed
        return ImportResult(path.name, "refused", f"cannot be read: {exc.strerror}")
    with opened as file:
        try:
            info = await asyncio.to_thread(inspect_lora, file)
        except LoraRejected as exc:
            return ImportResult(path.name, "refused", f"{exc.code}: {exc.message}")
        preset = registry.get(base_model) if base_model else _reference_preset(registry, info)
        if preset is None:
            reason = (f"unknown model {base_model!r}" if base_model else
                      "its keys do not say which family it is for; pass --base-model")
            return ImportResult(path.name, "refused", reason)
        existing = await session.scalar(select(Lora).where(
            Lora.tenant_id == tenant.id, Lora.sha256 == info.sha256,
            Lora.base_model == preset.name))
        if existing is not None:
            return ImportResult(path.name, "exists", f"already imported as {existing.name!r}",
                                existing.id)
        try:
            lora = await create_lora(
                session=session, store=store, registry=registry, tenant=tenant,
                name=lora_name_from_filename(path.name), base_model=preset.name, file=file,
                source="import", info=info)
        except ValidationFailed as exc:
            message = "; ".join(str(error.get("message")) for error in exc.errors)
            return ImportResult(path.name, "refused", f"{exc.code}: {message}")
    return ImportResult(path.name, "imported", f"{lora.name} ({lora.family}, "
                        f"{lora.format}, rank {lora.rank}) for {lora.base_model}", lora.id)


async def import_lora_folder(
    *, session: AsyncSession, store: GatewayStore, registry: ModelRegistry, tenant: Tenant,
    folder: Path, base_model: str | None = None,
) -> list[ImportResult]:
    """Every file directly in ``folder`` (hidden files and webui's preview images and
    ``.json``/``.txt`` sidecars skipped); one bad file never stops the others."""
    sidecars = {".png", ".jpg", ".jpeg", ".webp", ".json", ".txt", ".info", ".yaml"}
    results = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir() or path.suffix.lower() in sidecars:
            continue
        if not path.is_file():  # said, not skipped: the user expected a LoRA there
            results.append(ImportResult(path.name, "refused", "not a regular file (a broken "
                                        "link, a FIFO or a device)"))
            continue
        results.append(await import_lora_file(session=session, store=store, registry=registry,
                                              tenant=tenant, path=path, base_model=base_model))
    return results

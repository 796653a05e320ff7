"""Text-to-image submissions: validate, record, enqueue — in that order."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.control.service import check_openpose_photo
from services.gateway.deps import GatewayState
from services.gateway.jobs.service import apply_event
from services.gateway.loras.service import resolve_loras
from services.gateway.uploads.service import resolve_inputs
from shared.db.models import Job, Tenant, utcnow
from shared.errors import Conflict, ServiceUnavailable
from shared.models import ControlType
from shared.queue import GENERATE_TASK, GENERATOR_QUEUE, enqueue
from shared.specs import (
    GenerationSpec,
    GenerationTask,
    JobKind,
    JobStatus,
    LoraRef,
    SafetyPolicy,
    resolve_generation,
)

logger = logging.getLogger(__name__)


def request_hash(spec: BaseModel) -> str:
    """Hash of what the client sent (not of server-filled fields such as a drawn seed)."""
    sent = spec.model_dump(mode="json", exclude_unset=True)
    return hashlib.sha256(json.dumps(sent, sort_keys=True).encode()).hexdigest()


def safety_policy(tenant: Tenant) -> SafetyPolicy | None:
    if tenant.safety_action in ("blur", "withhold"):
        return SafetyPolicy(action=tenant.safety_action,  # type: ignore[arg-type]
                            threshold=tenant.safety_threshold)
    return None


async def find_replay(
    *, session: AsyncSession, tenant: Tenant, key: str, digest: str
) -> Job | None:
    job = await session.scalar(
        select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == key)
    )
    if job is not None and job.request_hash != digest:
        raise Conflict(
            "this Idempotency-Key was used with a different request body",
            code="idempotency_key_reused",
        )
    return job


async def prepare_generation(
    *, session: AsyncSession, state: GatewayState, tenant: Tenant, spec: GenerationSpec,
) -> tuple[GenerationSpec, dict[str, str], list[LoraRef], tuple[int, int] | None]:
    """Everything checked before a job exists: inputs stored, presets applied, LoRAs found."""
    for index, control in enumerate(spec.controls):
        if control.type == ControlType.OPENPOSE and control.image is not None and control.preprocess:
            check_openpose_photo(state.settings.generator.openpose_detector,
                                 f"controls.{index}.preprocess")
    spec, inputs, input_size = await resolve_inputs(
        session=session, store=state.store, tenant_id=tenant.id, spec=spec)
    resolved = resolve_generation(
        spec, registry=state.registry, default_model=state.settings.generator.default_model,
        input_size=input_size,
    )
    preset = state.registry.get(resolved.model or "")
    assert preset is not None  # resolve_generation checked it
    loras = await resolve_loras(session=session, tenant=tenant, uses=resolved.loras,
                                preset=preset)
    return resolved, inputs, loras, input_size


async def submit_generation(
    *, session: AsyncSession, state: GatewayState, tenant: Tenant, spec: GenerationSpec,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """Returns the job and whether it was created now (False: an idempotent replay)."""
    digest = request_hash(spec)
    if idempotency_key and (
        existing := await find_replay(session=session, tenant=tenant, key=idempotency_key,
                                  digest=digest)
    ):
        return existing, False
    resolved, inputs, loras, _ = await prepare_generation(
        session=session, state=state, tenant=tenant, spec=spec)
    return await create_and_enqueue(
        session=session, state=state, tenant=tenant, kind=JobKind.GENERATION,
        spec=resolved.model_dump(mode="json"), digest=digest, idempotency_key=idempotency_key,
        task_name=GENERATE_TASK,
        payload=lambda job_id: GenerationTask(
            job_id=job_id, tenant_id=tenant.id, spec=resolved, inputs=inputs, loras=loras,
            safety=safety_policy(tenant)).model_dump(mode="json"),
    )


async def create_and_enqueue(
    *, session: AsyncSession, state: GatewayState, tenant: Tenant, kind: JobKind,
    spec: dict[str, Any], digest: str, idempotency_key: str | None, task_name: str,
    payload: Callable[[str], dict[str, Any]], queue: str = GENERATOR_QUEUE,
) -> tuple[Job, bool]:
    """Commit the job row, then enqueue it; a queue failure ends the job in ``failed``."""
    job = Job(
        tenant_id=tenant.id, kind=kind.value, status=JobStatus.QUEUED.value,
        spec=spec, idempotency_key=idempotency_key,
        request_hash=digest, result={}, progress=0.0, last_seq=0, attempts=0,
        cancel_requested=False, created_at=utcnow(),
    )
    session.add(job)
    try:
        await session.commit()
    except IntegrityError:
        # A concurrent request with the same key won the race: answer as its replay.
        await session.rollback()
        if idempotency_key and (
            existing := await find_replay(session=session, tenant=tenant, key=idempotency_key,
                                      digest=digest)
        ):
            return existing, False
        raise
    try:
        await state.events.create(job.id, tenant_id=tenant.id)
        queued = await state.events.emit(job.id, "queued", allowed_from=(JobStatus.QUEUED,),
                                         data={"queue": queue})
        await enqueue(state.redis, queue=queue, task=task_name, job_id=job.id,
                      payload=payload(job.id))
    except Exception as exc:
        logger.exception("enqueue failed", extra={"job_id": job.id})
        job.status = JobStatus.FAILED.value
        job.error_code = "queue_unavailable"
        job.error_message = "the job could not be queued; submit it again"
        job.finished_at = utcnow()
        await session.commit()
        raise ServiceUnavailable("the job queue is unavailable; try again",
                                 code="queue_unavailable") from exc
    if queued.event is not None:
        await apply_event(session=session, event=queued.event)
        await session.commit()
        await session.refresh(job)
    return job, True

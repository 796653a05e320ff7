"""Generation submissions: everything checked before a job exists (inputs stored, presets
applied, LoRAs found); recording and enqueueing is ``services.gateway.jobs.submission``'s."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.control.service import check_openpose_photo
from services.gateway.db.models import Job, Tenant
from services.gateway.deps import GatewayState
from services.gateway.generations.resolve import resolve_generation
from services.gateway.jobs.submission import create_and_enqueue, find_replay, request_hash
from services.gateway.loras.service import resolve_loras
from services.gateway.subjects.service import subject_loras, subject_triggers, with_triggers
from services.gateway.uploads.service import resolve_inputs
from services.gateway.webhooks.service import check_job_webhook
from shared.errors import ValidationFailed
from shared.models import ControlType
from shared.queue import GENERATE_TASK
from shared.specs import (
    MAX_PROMPT_CHARS,
    GenerationSpec,
    GenerationTask,
    JobKind,
    LoraRef,
    LoraUse,
    SafetyPolicy,
)


def safety_policy(tenant: Tenant) -> SafetyPolicy | None:
    if tenant.safety_action in ("blur", "withhold"):
        return SafetyPolicy(action=tenant.safety_action,
                            threshold=tenant.safety_threshold)
    return None


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
    uses = list(resolved.loras)
    if resolved.subject is not None:
        person = await subject_loras(session, tenant, resolved.subject, field="subject")
        if person.lora_id not in {use.id for use in uses} | {person.id}:
            uses.append(LoraUse(id=person.lora_id or "", weight=1.0))
    loras = await resolve_loras(session=session, tenant=tenant, uses=uses, preset=preset)
    triggers = [word for subject_id in dict.fromkeys(lora.subject_id for lora in loras
                                                     if lora.subject_id)
                for word in await subject_triggers(session, subject_id or "")]
    if triggers:  # a subject's LoRA learned its trigger: the prompt names it
        prompt = with_triggers(resolved.prompt, triggers)
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValidationFailed([{"field": "prompt", "message": "with the subject's trigger "
                                     f"words the prompt is over {MAX_PROMPT_CHARS} characters"}])
        resolved = resolved.model_copy(update={"prompt": prompt})
    return resolved, inputs, loras, input_size


async def submit_generation(
    *, session: AsyncSession, state: GatewayState, tenant: Tenant, spec: GenerationSpec,
    idempotency_key: str | None, origin: dict[str, Any] | None = None,
) -> tuple[Job, bool]:
    """Returns the job and whether it was created now (False: an idempotent replay).

    ``origin``: where a compatibility adapter's request came from, recorded in the job's spec
    as ``compat`` (never sent to the worker)."""
    digest = request_hash(spec)
    if idempotency_key and (
        existing := await find_replay(session=session, tenant=tenant, key=idempotency_key,
                                  digest=digest)
    ):
        return existing, False
    webhook = await check_job_webhook(settings=state.settings, webhook=spec.webhook)
    resolved, inputs, loras, _ = await prepare_generation(
        session=session, state=state, tenant=tenant, spec=spec)
    return await create_and_enqueue(
        session=session, state=state, tenant=tenant, kind=JobKind.GENERATION,
        spec={**resolved.model_dump(mode="json"), **({"compat": origin} if origin else {})},
        digest=digest, idempotency_key=idempotency_key,
        task_name=GENERATE_TASK, webhook=webhook,
        payload=lambda job_id: GenerationTask(
            job_id=job_id, tenant_id=tenant.id, spec=resolved, inputs=inputs, loras=loras,
            safety=safety_policy(tenant)).model_dump(mode="json"),
        loras=loras,
    )

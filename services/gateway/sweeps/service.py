"""Parameter sweeps: one job that renders every cell of a grid and a labelled contact sheet."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.db.models import Job, Tenant
from services.gateway.deps import GatewayState
from services.gateway.generations.resolve import resolve_generation
from services.gateway.generations.service import prepare_generation, safety_policy
from services.gateway.jobs.submission import create_and_enqueue, find_replay, request_hash
from services.gateway.sweeps.cells import sweep_cells
from services.gateway.webhooks.service import check_job_webhook
from shared.errors import ValidationFailed
from shared.queue import SWEEP_TASK
from shared.specs import GenerationSpec, JobKind, SweepSpec, SweepTask


async def submit_sweep(
    *, session: AsyncSession, state: GatewayState, tenant: Tenant, sweep: SweepSpec,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """Every cell is validated here, so a bad value is a 422 naming its axis and position."""
    digest = request_hash(sweep)
    if idempotency_key and (existing := await find_replay(session=session, tenant=tenant,
                                                      key=idempotency_key, digest=digest)):
        return existing, False
    webhook = await check_job_webhook(settings=state.settings, webhook=sweep.webhook)
    try:
        base, inputs, loras, input_size = await prepare_generation(
            session=session, state=state, tenant=tenant, spec=sweep.base)
    except ValidationFailed as exc:  # errors of the base spec: name them as the body has them
        based = ValidationFailed([{**error, "field": f"base.{error['field']}"}
                                  for error in exc.errors])
        based.status, based.code = exc.status, exc.code
        raise based from exc
    # The base's seed is fixed once, so axes that do not vary it share one seed.
    unset = sweep.base.model_dump(exclude_unset=True)
    fixed = {"seed": base.seed} if "seed" not in unset else {}
    sweep = sweep.model_copy(update={"base": sweep.base.model_copy(update={
        "init_image": base.init_image, "mask": base.mask, "controls": base.controls, **fixed})})

    def resolve(spec: GenerationSpec) -> GenerationSpec:
        return resolve_generation(spec, registry=state.registry,
                                  default_model=state.settings.generator.default_model,
                                  input_size=input_size)

    cells = sweep_cells(sweep, resolve=resolve)
    return await create_and_enqueue(
        session=session, state=state, tenant=tenant, kind=JobKind.SWEEP,
        spec={**sweep.model_dump(mode="json"), "cells": len(cells)}, digest=digest,
        idempotency_key=idempotency_key, task_name=SWEEP_TASK, webhook=webhook,
        payload=lambda job_id: SweepTask(
            job_id=job_id, tenant_id=tenant.id, sweep=sweep, cells=cells, inputs=inputs,
            loras=loras, safety=safety_policy(tenant)).model_dump(mode="json"),
        loras=loras,
    )

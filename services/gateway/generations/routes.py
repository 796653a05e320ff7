"""HTTP for text-to-image."""

from __future__ import annotations

from fastapi import APIRouter, Response

from services.gateway.deps import SessionDep, StateDep, TenantDep
from services.gateway.generations.service import submit_generation
from services.gateway.jobs.idempotency import IdempotencyKeyDep
from services.gateway.jobs.schemas import JobOut
from services.gateway.jobs.service import job_out
from services.gateway.problems import PROBLEM_RESPONSES
from shared.specs import GenerationSpec

router = APIRouter(prefix="/v1/generations", tags=["generations"], responses=PROBLEM_RESPONSES)


@router.post("", response_model=JobOut, status_code=202, summary="Generate images from text")
async def create_generation(
    spec: GenerationSpec,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    state: StateDep,
    idempotency_key: IdempotencyKeyDep,
) -> JobOut:
    """Queue a text-to-image job. Follow it with `GET /v1/jobs/{id}` or its `events` stream;
    when it succeeds its `artifacts` carry presigned URLs of the PNGs and `manifest.json`."""
    job, created = await submit_generation(
        session=session, state=state, tenant=tenant, spec=spec, idempotency_key=idempotency_key
    )
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(job, store=state.store, artifacts=job.artifacts)

"""HTTP for parameter sweeps."""

from __future__ import annotations

from fastapi import APIRouter, Response

from services.gateway.deps import SessionDep, StateDep, TenantDep
from services.gateway.jobs.idempotency import IdempotencyKeyDep
from services.gateway.jobs.schemas import JobOut
from services.gateway.jobs.service import job_out
from services.gateway.problems import PROBLEM_RESPONSES
from services.gateway.sweeps.service import submit_sweep
from shared.specs import SweepSpec

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"], responses=PROBLEM_RESPONSES)


@router.post("", response_model=JobOut, status_code=202, summary="Sweep parameters over a grid")
async def create_sweep(
    sweep: SweepSpec, response: Response, session: SessionDep, tenant: TenantDep,
    state: StateDep,
    idempotency_key: IdempotencyKeyDep,
) -> JobOut:
    """Render `base` once per combination of the axes' values (e.g. guidance_scale x seed).
    The job's artifacts are every cell's PNG (`index` = row * columns + column), a labelled
    `contact_sheet` PNG and a `metadata` JSON listing each cell's full, resolved spec."""
    job, created = await submit_sweep(session=session, state=state, tenant=tenant, sweep=sweep,
                                      idempotency_key=idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(job, store=state.store, artifacts=job.artifacts)

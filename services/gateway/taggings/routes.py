"""HTTP for captioning/tagging jobs."""

from __future__ import annotations

from fastapi import APIRouter, Response

from services.gateway.deps import SessionDep, StateDep, TenantDep
from services.gateway.jobs.idempotency import IdempotencyKeyDep
from services.gateway.jobs.schemas import JobOut
from services.gateway.jobs.service import job_out
from services.gateway.problems import PROBLEM_RESPONSES
from services.gateway.taggings.service import submit_tagging
from shared.specs import TaggingSpec

router = APIRouter(prefix="/v1/taggings", tags=["taggings"], responses=PROBLEM_RESPONSES)


@router.post("", response_model=JobOut, status_code=202, summary="Caption and tag a dataset")
async def create_tagging(
    spec: TaggingSpec, response: Response, session: SessionDep, tenant: TenantDep,
    state: StateDep, idempotency_key: IdempotencyKeyDep,
) -> JobOut:
    """Queue a tagger job over every image of a dataset: BLIP-class captions (filling missing
    ones unless `caption.overwrite`), WD14-class tags with thresholds, then cleaning. Progress
    arrives per batch; when the job succeeds the dataset's items carry the results, its
    artifacts include kohya `metadata.json` and per-image `results.json`, and an image that
    failed is listed in `result.failed` without losing the others."""
    job, created = await submit_tagging(session=session, state=state, tenant=tenant, spec=spec,
                                        idempotency_key=idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(job, store=state.store, artifacts=job.artifacts)

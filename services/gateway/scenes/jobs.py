"""HTTP for scene jobs: `POST /v1/scenes`."""

from __future__ import annotations

from fastapi import APIRouter, Response

from services.gateway.deps import SessionDep, StateDep, TenantDep
from services.gateway.jobs.idempotency import IdempotencyKeyDep
from services.gateway.jobs.schemas import JobOut
from services.gateway.jobs.service import job_out
from services.gateway.problems import PROBLEM_RESPONSES
from services.gateway.scenes.submission import submit_scene
from shared.specs.scene import SceneSpec

router = APIRouter(prefix="/v1/scenes", tags=["scenes"], responses=PROBLEM_RESPONSES)


@router.post("", response_model=JobOut, status_code=202, summary="Put a person into a place")
async def create_scene(
    spec: SceneSpec,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    state: StateDep,
    idempotency_key: IdempotencyKeyDep,
) -> JobOut:
    """Queue a scene: a person of the given age and gender, posed by the action's shot, is
    inpainted into the place's image inside the shot's body mask (ControlNet on its pose
    guide); with a `lora`, their face is then inpainted inside the face mask with it. The job's
    artifacts are the images, the pose control image, both masks, each stage-1 image and the
    manifest; its `result` has the prompt, the action and (from `action_text`) every action's
    score."""
    job, created = await submit_scene(session=session, state=state, tenant=tenant, spec=spec,
                                      idempotency_key=idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(job, store=state.store, artifacts=job.artifacts)

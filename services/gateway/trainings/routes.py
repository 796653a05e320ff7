"""HTTP for LoRA training jobs."""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from services.gateway.db.models import Job
from services.gateway.deps import SessionDep, StateDep, TenantDep
from services.gateway.jobs.idempotency import IdempotencyKeyDep
from services.gateway.jobs.schemas import JobOut
from services.gateway.jobs.service import job_out
from services.gateway.problems import PROBLEM_RESPONSES
from services.gateway.trainings.plan import plan_training, training_metrics
from services.gateway.trainings.schemas import TrainingMetrics, TrainingPlan, TrainingRequest
from services.gateway.trainings.service import submit_training
from shared.errors import NotFound
from shared.keys import (
    training_checkpoints_prefix,
    training_prefix,
    training_samples_prefix,
    training_state_step,
)
from shared.specs import JobKind

router = APIRouter(prefix="/v1/trainings", tags=["trainings"], responses=PROBLEM_RESPONSES)


@router.post("", response_model=JobOut, status_code=202, summary="Train a LoRA")
async def create_training(
    spec: TrainingRequest, response: Response, session: SessionDep, tenant: TenantDep,
    state: StateDep, idempotency_key: IdempotencyKeyDep,
) -> JobOut:
    """Train a LoRA on a dataset with kohya's options. Progress events carry step, epoch,
    loss, learning rate, it/s and ETA; `sample` events announce sample images. On success the
    LoRA is registered (`result.lora.id`) and usable in `/v1/generations` at once. Cancel
    stops at the next step and keeps the last checkpoint; `resume_from` continues a run from
    its saved state (step and epoch included)."""
    job, created = await submit_training(session=session, state=state, tenant=tenant, spec=spec,
                                         idempotency_key=idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(job, store=state.store, artifacts=job.artifacts)


@router.post("/plan", response_model=TrainingPlan, summary="Plan a training without running it")
async def plan(spec: TrainingRequest, session: SessionDep, tenant: TenantDep,
               state: StateDep) -> TrainingPlan:
    """What `POST /v1/trainings` with the same body would run, as kohya's `--debug_dataset`
    shows it: subsets with their repeats, buckets with their images, steps per epoch and in
    all, and warnings (images smaller than their bucket, buckets smaller than a batch,
    captions without the trigger). It reads what the dataset's records hold, never its
    images, and a body the submission would refuse is the same 422 here."""
    return await plan_training(session=session, state=state, tenant=tenant, spec=spec)


@router.get("/{job_id}/metrics", response_model=TrainingMetrics,
            summary="A training's loss, learning rate and step time per step")
async def metrics(job_id: str, session: SessionDep, tenant: TenantDep,
                  state: StateDep) -> TrainingMetrics:
    """Every step of the run so far (not only the latest progress event), to draw the loss
    curve from; the finished job also has it as `metrics` (JSON) and `loss_curve` (PNG)
    artifacts."""
    return await training_metrics(session=session, state=state, tenant=tenant, job_id=job_id)


class TrainingFile(BaseModel):
    step: int = Field(description="The step it was made at.")
    index: int | None = Field(default=None, description="A sample's prompt line, from 0.")
    url: str = Field(description="Presigned download URL.")


class TrainingFiles(BaseModel):
    samples: list[TrainingFile] = Field(description="Sample images so far, by step.")
    checkpoints: list[TrainingFile] = Field(description="The LoRA as it was at each saved step.")


@router.get("/{job_id}/files", response_model=TrainingFiles,
            summary="A training's sample images and checkpoints so far")
async def files(job_id: str, session: SessionDep, tenant: TenantDep,
                state: StateDep) -> TrainingFiles:
    """Download links for what a run has made while it runs (`sample` events name the same
    images by storage key): every sample and checkpoint, step by step."""
    known = await session.scalar(select(Job.id).where(
        Job.id == job_id, Job.tenant_id == tenant.id, Job.kind == JobKind.TRAINING.value))
    if known is None:
        raise NotFound(f"training job {job_id} not found", code="job_not_found")
    prefix = training_prefix(tenant.id, job_id)
    samples, checkpoints = [], []
    for key in sorted(await state.store.list(training_samples_prefix(prefix))):
        name = key.rsplit("/", 1)[-1]
        if name.startswith("step-"):
            step, _, index = name.removeprefix("step-").removesuffix(".png").partition("-")
            samples.append(TrainingFile(step=int(step), index=int(index or 0),
                                        url=state.store.presign_get(key)))
    for key in sorted(await state.store.list(training_checkpoints_prefix(prefix))):
        checkpoints.append(TrainingFile(step=training_state_step(key),
                                        url=state.store.presign_get(key)))
    return TrainingFiles(samples=samples, checkpoints=checkpoints)

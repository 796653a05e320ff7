"""What both adapters do with a request: submit ordinary Loomis generation jobs, wait for
them, and hand back their images.

Nothing here bypasses the native API: a compat request is the same ``submit_generation`` a
``POST /v1/generations`` makes (tenancy, limits, validation, lineage, webhooks, manifests), with
an ``origin`` recorded in the job's spec (``compat``: which API, and its ``user`` or key), so
every compat request is a job in ``/v1/jobs``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.db.models import Tenant
from services.gateway.deps import GatewayState
from services.gateway.generations.service import submit_generation
from services.gateway.jobs.schemas import JobOut
from services.gateway.jobs.service import read_job
from shared.errors import LoomisError
from shared.specs import MAX_SEED, GenerationSpec, JobStatus

MAX_IMAGES_PER_JOB = 8  # GenerationSpec.num_images' bound


class JobTimeout(LoomisError):
    status, code, title = 504, "job_timeout", "The job is still running"


class JobFailed(LoomisError):
    status, code, title = 500, "job_failed", "The job failed"


@dataclass(frozen=True)
class Image:
    """One output: its PNG bytes (with the worker's text chunks) and where it is stored."""

    png: bytes
    key: str
    seed: int | None
    job_id: str
    index: int


@dataclass(frozen=True)
class Outcome:
    jobs: list[JobOut]  # those that succeeded
    images: list[Image]
    canceled: list[str]  # with ``canceled_ok``: jobs canceled (webui's interrupt and skip)


async def submit_all(*, session: AsyncSession, state: GatewayState, tenant: Tenant,
                     spec: GenerationSpec, total: int, origin: dict[str, Any]) -> list[str]:
    """``total`` images as jobs of at most 8 each; image i has seed + i throughout, as in one
    job, so the split is invisible in the pixels."""
    ids: list[str] = []
    done = 0
    while done < total:
        count = min(MAX_IMAGES_PER_JOB, total - done)
        part = spec.model_copy(update={
            "num_images": count,
            "seed": None if spec.seed is None else (spec.seed + done) % (MAX_SEED + 1)})
        if spec.seed is None and ids:  # later parts continue the first part's drawn seed
            first = await read_job(reads=state.reads, tenant=tenant, store=state.store,
                                   job_id=ids[0])
            part = part.model_copy(update={"seed": (int(first.spec["seed"]) + done)
                                           % (MAX_SEED + 1)})
        job, _ = await submit_generation(session=session, state=state, tenant=tenant, spec=part,
                                         idempotency_key=None, origin=origin)
        ids.append(job.id)
        done += count
    return ids


async def wait_for(*, state: GatewayState, tenant: Tenant, job_ids: list[str],
                   timeout_s: float, canceled_ok: bool = False) -> Outcome:
    """Block until every job has ended as SQL records it; a 504 naming the jobs after
    ``timeout_s`` (they keep running: nothing is lost), a 500 with the job's error when one
    failed or was canceled."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    jobs: list[JobOut] = []
    canceled: list[str] = []
    for job_id in job_ids:
        after, ended = "0", False
        while True:
            job = await read_job(reads=state.reads, tenant=tenant, store=state.store,
                                 job_id=job_id)
            if job.status.terminal:
                break
            left = deadline - loop.time()
            if left <= 0:
                named = ", ".join(job_ids)
                raise JobTimeout(f"the job is still {job.status.value} after {timeout_s:.0f} s; "
                                 f"follow it at /v1/jobs/{job_id} (jobs: {named})",
                                 job_ids=job_ids)
            # the job's own stream wakes this at once; SQL (which the consumer writes just
            # after) stays what is read, so the answer is what GET /v1/jobs/{id} says
            if ended:  # the end is in Redis; SQL has it once the consumer commits
                await asyncio.sleep(0.01)
                continue
            events = await state.events.read_job_stream(
                job_id, after_stream_id=after, block_ms=int(min(left, 1.0) * 1000))
            if events:
                after = events[-1][0]
                ended = any(event.status.terminal for _, event in events)
        if job.status is JobStatus.CANCELED and canceled_ok:
            canceled.append(job.id)
            continue
        if job.status is not JobStatus.SUCCEEDED:
            error = job.error
            raise JobFailed(f"job {job.id} {job.status.value}: "
                            f"{error.message if error else 'no reason recorded'}",
                            code=error.code if error else f"job_{job.status.value}",
                            job_ids=job_ids)
        jobs.append(job)
    images: list[Image] = []
    for job in jobs:
        row = await _artifact_keys(state, tenant, job.id)
        for index, key, seed in row:
            images.append(Image(png=await state.store.get(key), key=key, seed=seed,
                                job_id=job.id, index=index))
    return Outcome(jobs=jobs, images=images, canceled=canceled)


async def _artifact_keys(state: GatewayState, tenant: Tenant,
                         job_id: str) -> list[tuple[int, str, int | None]]:
    from sqlalchemy import select

    from services.gateway.db.models import Artifact

    rows = await state.reads.run(lambda conn: conn.execute(
        select(Artifact.index.label("position"), Artifact.key, Artifact.seed)
        .where(Artifact.job_id == job_id, Artifact.tenant_id == tenant.id,
               Artifact.kind == "image").order_by(Artifact.index)).all())
    return [(int(row.position or 0), str(row.key), row.seed) for row in rows]


async def run(*, session: AsyncSession, state: GatewayState, tenant: Tenant,
              spec: GenerationSpec, total: int, origin: dict[str, Any],
              canceled_ok: bool = False) -> Outcome:
    job_ids = await submit_all(session=session, state=state, tenant=tenant, spec=spec,
                               total=total, origin=origin)
    await session.close()  # waiting may take minutes: hold no pooled connection
    return await wait_for(state=state, tenant=tenant, job_ids=job_ids,
                          timeout_s=state.settings.compat.wait_s, canceled_ok=canceled_ok)

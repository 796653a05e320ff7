"""Jobs: reading them tenant-scoped, applying worker events to them, cancelling them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from types import SimpleNamespace
from typing import Any, Protocol

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import joinedload, lazyload

from services.gateway.db.models import Artifact, Job, JobEventRow, Tenant, utcnow
from services.gateway.db.reads import Reads
from services.gateway.files.stores import GatewayStore
from services.gateway.jobs.schemas import ArtifactOut, JobError, JobOut, JobPage
from services.gateway.pagination import encode_cursor, newest_first
from services.gateway.scenes.outcome import cache_action_embeddings
from services.gateway.subjects.service import on_job_finished
from services.gateway.taggings.outcome import write_item_results
from services.gateway.trainings.outcome import register_trained_lora
from services.gateway.webhooks.service import enqueue_deliveries
from shared.errors import Conflict, NotFound
from shared.events import JobEvent, JobEvents
from shared.outcomes import (
    GenerationSucceeded,
    SceneSucceeded,
    Succeeded,
    SweepSucceeded,
    TaggingSucceeded,
    TrainingSucceeded,
)
from shared.specs import TERMINAL_STATUSES, WEBHOOK_EVENT_TYPES, JobKind, JobStatus

_TERMINAL = [s.value for s in TERMINAL_STATUSES]
_KINDS = {kind.value for kind in JobKind}

# Each kind's ``succeeded`` event data, as its worker builds it.
SUCCEEDED: dict[JobKind, type[Succeeded]] = {
    JobKind.GENERATION: GenerationSucceeded, JobKind.SWEEP: SweepSucceeded,
    JobKind.TAGGING: TaggingSucceeded, JobKind.TRAINING: TrainingSucceeded,
    JobKind.SCENE: SceneSucceeded,
}


def parse_succeeded(kind: JobKind, data: dict[str, Any]) -> Succeeded:
    """A succeeded event's data as its kind's model (a ``ValidationError`` when a worker sent
    what no worker should: the event consumer then parks the event and fails the job)."""
    return SUCCEEDED[kind].model_validate(data)


# Each kind's domain takes what a succeeded job of that kind made (subjects take every
# terminal event of their own jobs, below).
# (Webhooks take every event of every kind, in ``apply_event`` itself.)
ON_SUCCEEDED: dict[JobKind, Callable[[AsyncSession, Job, Succeeded], Awaitable[None]]] = {
    JobKind.TRAINING: register_trained_lora,
    JobKind.TAGGING: write_item_results,
    JobKind.SCENE: cache_action_embeddings,
}


async def get_job(*, session: AsyncSession, tenant: Tenant, job_id: str) -> Job:
    """Another tenant's job is reported as missing, not forbidden: its existence is private."""
    # the artifacts joined in: one round trip, not the relationship's second select-in query
    job = (await session.execute(
        select(Job).options(joinedload(Job.artifacts))
        .where(Job.id == job_id, Job.tenant_id == tenant.id)
    )).unique().scalar_one_or_none()
    if job is None:
        raise NotFound(f"job {job_id} not found", code="job_not_found")
    return job


class _ArtifactFields(Protocol):
    kind: str
    index: int | None
    key: str
    content_type: str
    size: int
    sha256: str
    width: int | None
    height: int | None
    seed: int | None


class _JobFields(Protocol):
    """What :func:`job_out` reads: a loaded :class:`Job` or a Core row of its columns."""

    id: str
    kind: str
    status: str
    progress: float
    cancel_requested: bool
    spec: dict[str, Any]
    error_code: str | None
    error_message: str | None
    result: dict[str, Any]
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


_JOB_COLUMNS = (Job.id, Job.kind, Job.status, Job.progress, Job.cancel_requested, Job.spec,
                Job.error_code, Job.error_message, Job.result, Job.attempts, Job.created_at,
                Job.started_at, Job.finished_at)
_ARTIFACT_COLUMNS = (Artifact.job_id, Artifact.kind, Artifact.index, Artifact.key,
                     Artifact.content_type, Artifact.size, Artifact.sha256, Artifact.width,
                     Artifact.height, Artifact.seed)


def _artifacts_of(conn: Connection, job_ids: list[str]) -> dict[str, list[Any]]:
    by_job: dict[str, list[Any]] = {job_id: [] for job_id in job_ids}
    if job_ids:
        for row in conn.execute(select(*_ARTIFACT_COLUMNS)
                                .where(Artifact.job_id.in_(job_ids)).order_by(Artifact.id)):
            by_job[row.job_id].append(row)
    return by_job


# The poll's statement, built once (building and cache-keying it cost more than running it):
# one round trip (each is a hop through the driver's thread), the job's columns on every row,
# its artifacts' beside them, none when it has no artifact.
_JOB_WITH_ARTIFACTS = (
    select(*_JOB_COLUMNS, *(column.label(f"artifact_{column.key}") for column in _ARTIFACT_COLUMNS[1:]))
    .outerjoin(Artifact, Artifact.job_id == Job.id)
    .where(Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"))
    .order_by(Artifact.id)
)


async def read_job(*, reads: Reads, tenant: Tenant, store: GatewayStore, job_id: str) -> JobOut:
    """``GET /v1/jobs/{id}``, the endpoint clients poll: Core rows, no ORM instances (their
    identity map and loaders cost more than the query), in one trip (:class:`Reads`)."""
    params = {"job_id": job_id, "tenant_id": tenant.id}
    rows = await reads.run(lambda conn: conn.execute(_JOB_WITH_ARTIFACTS, params).all())
    if not rows:
        raise NotFound(f"job {job_id} not found", code="job_not_found")
    artifacts = [SimpleNamespace(**{key.removeprefix("artifact_"): value
                                    for key, value in row._mapping.items()
                                    if key.startswith("artifact_")})
                 for row in rows if row.artifact_key is not None]
    return job_out(rows[0], store=store, artifacts=artifacts)


def job_out(job: _JobFields, *, store: GatewayStore, artifacts: Sequence[_ArtifactFields],
            url_ttl_s: int | None = None) -> JobOut:
    """The API's view of a job (a loaded :class:`Job` passes its own ``artifacts``);
    ``url_ttl_s``: how long its artifact URLs last (default: the store's)."""
    error = JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None
    return JobOut(
        id=job.id,
        kind=JobKind(job.kind),
        status=JobStatus(job.status),
        progress=job.progress,
        cancel_requested=job.cancel_requested,
        spec=job.spec,
        error=error,
        artifacts=[
            ArtifactOut(
                kind=a.kind, index=a.index, url=store.presign_get(a.key, expires_s=url_ttl_s),
                content_type=a.content_type, size=a.size, sha256=a.sha256,
                width=a.width, height=a.height, seed=a.seed,
            )
            for a in artifacts
        ],
        result=job.result,
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        links={
            "self": f"/v1/jobs/{job.id}",
            "events": f"/v1/jobs/{job.id}/events",
            "cancel": f"/v1/jobs/{job.id}/cancel",
        },
    )


async def list_jobs(
    *, reads: Reads, tenant: Tenant, store: GatewayStore, limit: int,
    cursor: str | None, kind: JobKind | None, status: JobStatus | None,
) -> JobPage:
    """Newest first; the cursor is the last row's (created_at, id) so pages never shift."""
    query = select(*_JOB_COLUMNS).where(Job.tenant_id == tenant.id)
    if kind is not None:
        query = query.where(Job.kind == kind.value)
    if status is not None:
        query = query.where(Job.status == status.value)
    query = newest_first(query, Job.created_at, Job.id, limit=limit, cursor=cursor)

    def page(conn: Connection) -> tuple[list[Any], dict[str, list[Any]]]:
        rows = list(conn.execute(query))
        return rows, _artifacts_of(conn, [row.id for row in rows[:limit]])

    rows, artifacts = await reads.run(page)
    more = len(rows) > limit
    rows = rows[:limit]
    return JobPage(
        items=[job_out(row, store=store, artifacts=artifacts[row.id]) for row in rows],
        next_cursor=encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None,
    )


def _insert_ignoring_duplicates(session: AsyncSession, model: Any) -> Any:
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(model).on_conflict_do_nothing()


async def apply_event(*, session: AsyncSession, event: JobEvent,
                      webhook_progress_interval_s: float = 0.0) -> bool:
    """Persist one worker event exactly once; returns whether it changed the job.

    The event's webhook deliveries are queued in the same transaction, so they exist exactly
    when the event does. ``webhook_progress_interval_s`` throttles progress webhooks: the
    event consumer, the one caller that applies progress events, passes the setting.

    Re-delivered events hit the unique (job, seq) and are dropped; events older than the
    job's ``last_seq`` (possible when replicas share the stream) are recorded but do not move
    the job backwards; terminal states are never left.

    The job row is locked before the event row is written: every writer (the consumer, the
    cancel route, the SSE terminal write) then takes the two locks in the same order, which
    PostgreSQL needs to avoid a deadlock when two of them apply the same event at once.
    """
    kind: str | None = None
    if session.get_bind().dialect.name != "sqlite":
        kind = await session.scalar(
            select(Job.kind).where(Job.id == event.job_id).with_for_update())
    elif event.status is JobStatus.SUCCEEDED:
        # SQLite has no row locks (its one write lock comes with the first write below): only a
        # succeeded event, once per job, needs the kind before writing
        kind = await session.scalar(select(Job.kind).where(Job.id == event.job_id))
    # A succeeded event carries its kind's typed outcome; a malformed one raises here, before
    # anything is written, and the consumer parks it and fails the job.
    outcome = (parse_succeeded(JobKind(kind), event.data)
               if event.status is JobStatus.SUCCEEDED and kind in _KINDS else None)
    # A tagging job's per-image results ride on its terminal event; they go to the dataset's
    # items, not into the job's event log.
    stored_data = {k: v for k, v in event.data.items() if k != "dataset_items"}
    inserted = await session.execute(
        _insert_ignoring_duplicates(session, JobEventRow).values(
            job_id=event.job_id, seq=event.seq, type=event.type, status=event.status.value,
            at=event.at, data=stored_data,
        )
    )
    if inserted.rowcount == 0:  # type: ignore[attr-defined]
        return False
    values: dict[str, Any] = {"last_seq": event.seq, "status": event.status.value,
                              "updated_at": utcnow()}
    data = event.data
    if event.type == "progress" and "progress" in data:
        values["progress"] = float(data["progress"])
    if event.type == "running":
        values["started_at"] = event.at
        values["attempts"] = int(data.get("attempt", 1))
    if event.status in TERMINAL_STATUSES:
        values["finished_at"] = event.at
        if event.status is JobStatus.SUCCEEDED:
            values["progress"] = 1.0
        if "error" in data:
            values["error_code"] = str(data["error"].get("code", "job_failed"))
            values["error_message"] = str(data["error"].get("message", ""))
        if "result" in data:
            values["result"] = data["result"]
        if isinstance(data.get("spec_filled"), dict):
            # what only the worker could choose (the model's own scheduler), where the
            # spec left it open, so the job's spec is the one that ran
            spec = await session.scalar(select(Job.spec).where(Job.id == event.job_id)) or {}
            values["spec"] = {**spec, **{key: value for key, value in data["spec_filled"].items()
                                         if spec.get(key) is None}}
    changed = await session.execute(
        update(Job)
        .where(Job.id == event.job_id, Job.last_seq < event.seq, Job.status.not_in(_TERMINAL))
        .values(**values)
    )
    if changed.rowcount == 0:  # type: ignore[attr-defined]
        return False
    if outcome is None and event.type not in WEBHOOK_EVENT_TYPES:
        return True  # ``queued``, one per submission: nothing more takes it
    # The artifacts stay unloaded: nothing below reads them, and a job loaded by an earlier
    # event of the batch (or the cancel route, artifacts and all) is returned as it is.
    job = await session.get(Job, event.job_id, options=[lazyload(Job.artifacts)])
    assert job is not None  # updated above
    if outcome is not None:
        for ref in outcome.artifacts:
            await session.execute(
                _insert_ignoring_duplicates(session, Artifact).values(
                    job_id=event.job_id, tenant_id=job.tenant_id, **ref.model_dump()
                )
            )
        handler = ON_SUCCEEDED.get(JobKind(job.kind))
        if handler is not None:  # the job's own domain takes what the job made
            await handler(session, job, outcome)
    if event.status in TERMINAL_STATUSES:  # a subject's stage ended: its next one
        await on_job_finished(session, job, event, outcome)
    await enqueue_deliveries(session, job, event, webhook_progress_interval_s)
    return True


async def cancel_job(
    *, session: AsyncSession, events: JobEvents, tenant: Tenant, job_id: str
) -> Job:
    """A queued job is canceled at once; a running one at the worker's next step."""
    job = await get_job(session=session, tenant=tenant, job_id=job_id)
    if JobStatus(job.status) in TERMINAL_STATUSES:
        raise Conflict(f"job {job_id} already {job.status}", code="job_finished")
    await events.request_cancel(job_id)
    job.cancel_requested = True
    transition = await events.emit(
        job_id, "canceled", allowed_from=(JobStatus.QUEUED,), to=JobStatus.CANCELED,
        data={"reason": "canceled by client before it started"},
    )
    if transition.event is not None:
        await apply_event(session=session, event=transition.event)
    await session.commit()
    await session.refresh(job)
    return job

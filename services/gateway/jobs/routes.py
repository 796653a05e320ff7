"""HTTP for jobs of every kind: read, list, follow, cancel."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from pydantic import WithJsonSchema
from sqlalchemy import select
from sse_starlette import EventSourceResponse, ServerSentEvent

from services.gateway.db.models import JobEventRow
from services.gateway.deps import SessionDep, StateDep, TenantDep
from services.gateway.jobs import service
from services.gateway.jobs.schemas import JobOut, JobPage, JobStreamEvent
from services.gateway.problems import PROBLEM_RESPONSES
from services.gateway.webhooks.service import DELIVERIES_QUEUED
from shared.events import JobEvent
from shared.specs import JobKind, JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=PROBLEM_RESPONSES)

# Event ids are a job's seq, a 32-bit column on PostgreSQL; a larger Last-Event-ID cannot
# name an event, and reaching the database with one is an overflow (a 500) on both backends.
MAX_SEQ = 2**31 - 1


@router.get("/{job_id}", response_model=JobOut, summary="Get a job")
async def get_job(job_id: str, tenant: TenantDep, state: StateDep) -> Response:
    # serialised once, by pydantic's own serializer: returning the model would have FastAPI
    # validate it again and encode it a second time
    job = await service.read_job(reads=state.reads, tenant=tenant, store=state.store, job_id=job_id)
    return Response(job.model_dump_json(), media_type="application/json")


@router.get("", response_model=JobPage, summary="List jobs, newest first")
async def list_jobs(
    tenant: TenantDep,
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
    kind: JobKind | None = None,
    status: JobStatus | None = None,
) -> Response:
    page = await service.list_jobs(
        reads=state.reads, tenant=tenant, store=state.store, limit=limit, cursor=cursor,
        kind=kind, status=status,
    )
    return Response(page.model_dump_json(), media_type="application/json")


@router.post("/{job_id}/cancel", response_model=JobOut, status_code=202, summary="Cancel a job")
async def cancel_job(
    job_id: str, session: SessionDep, tenant: TenantDep, state: StateDep
) -> JobOut:
    """Queued jobs end in `canceled` at once; running ones at the worker's next step."""
    job = await service.cancel_job(session=session, events=state.events, tenant=tenant,
                                   job_id=job_id)
    return service.job_out(job, store=state.store, artifacts=job.artifacts)


class JobEventStream(EventSourceResponse):
    """Names its media type on the class, where OpenAPI generation looks for it."""

    media_type = "text/event-stream"


EVENTS_PATH = "/v1/jobs/{job_id}/events"


def document_event_stream(spec: dict[str, Any]) -> dict[str, Any]:
    """Describe one SSE message as what is on the wire: ``event`` and ``id`` lines and a ``data``
    line holding JSON (``contentSchema``). FastAPI would put the event objects' ``oneOf`` under
    ``type: string`` there, a schema no stream can satisfy, so clients and fuzzers that check
    responses against it failed every real stream."""
    content = spec["paths"][EVENTS_PATH]["get"]["responses"]["200"]["content"]["text/event-stream"]
    events = {key: value for key, value in content["schema"].items()
              if key in ("oneOf", "discriminator")}
    content["schema"] = {
        "type": "object",
        "description": "One Server-Sent Events message (its `event:`, `id:` and `data:` lines).",
        "required": ["event", "id", "data"],
        "properties": {
            "event": {"type": "string", "enum": sorted(events["discriminator"]["mapping"]),
                      "description": "The event's type, the same as `data.type`."},
            "id": {"type": "string", "pattern": "^[0-9]+$",
                   "description": "The job's event seq; send it back as `Last-Event-ID`."},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": events,
                     "description": "The event as JSON, one of the event schemas by `type`."},
        },
    }
    return spec


def _sse(event: JobEvent) -> ServerSentEvent:
    return ServerSentEvent(
        id=str(event.seq), event=event.type, data=json.dumps(event.model_dump(mode="json"))
    )


@router.get(
    "/{job_id}/events",
    summary="Follow a job (Server-Sent Events)",
    response_class=JobEventStream,
    responses={200: {
        "model": JobStreamEvent,
        "description": "`text/event-stream`: one SSE message per event, `event:` its type "
                       "(queued, running, progress, sample, succeeded, failed, canceled), `id:` "
                       "the job's seq, `data:` the JSON object described here. The stream ends "
                       "after a terminal event; comment lines are keep-alives.",
    }},
)
async def job_events(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    state: StateDep,
    # A header is absent or a value, never null: the schema says so (not `anyOf: [.., null]`).
    last_event_id: Annotated[int | None, WithJsonSchema(
        {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}), Header(
        alias="Last-Event-ID", ge=0, le=MAX_SEQ,
        description="The `id` of the last event received; the stream resumes after it.",
    )] = None,
) -> JobEventStream:
    """Replays what was persisted after `Last-Event-ID`, then follows live events until the
    job ends. Reconnect with the last `id` you saw to resume without gaps or repeats."""
    job = await service.get_job(session=session, tenant=tenant, job_id=job_id)
    after = last_event_id or 0
    stored = list(await session.scalars(
        select(JobEventRow).where(JobEventRow.job_id == job.id, JobEventRow.seq > after)
        .order_by(JobEventRow.seq)
    ))
    replay = [JobEvent(job_id=r.job_id, seq=r.seq, type=r.type, at=r.at,
                       status=JobStatus(r.status), data=r.data) for r in stored]
    finished = JobStatus(job.status).terminal
    job_id = job.id
    # A stream can last as long as the job; holding the request's pooled connection that long
    # would let a few dozen followers starve every other request. The terminal write below
    # opens its own short session.
    await session.close()

    async def stream() -> AsyncIterator[ServerSentEvent]:
        sent = after
        for event in replay:
            sent = event.seq
            yield _sse(event)
            if event.status.terminal:
                return
        if finished:
            return
        cursor = "0"
        while True:
            try:
                entries = await state.events.read_job_stream(
                    job_id, after_stream_id=cursor, block_ms=15_000
                )
            except asyncio.CancelledError:
                raise
            for entry_id, event in entries:
                cursor = entry_id  # the next read starts after the last entry seen
                if event.seq <= sent:
                    continue
                sent = event.seq
                if event.status.terminal:
                    # Persist before telling the client, so a GET right after the stream
                    # ends agrees with it; the consumer will see a duplicate and skip it.
                    async with state.sessionmaker() as db:
                        await service.apply_event(session=db, event=event)
                        await db.commit()
                        if db.info.pop(DELIVERIES_QUEUED, False):
                            state.wake_webhooks()
                    yield _sse(event)
                    return
                yield _sse(event)
            if not entries and await state.events.state(job_id) is None:
                return  # live state expired: nothing more will come

    return JobEventStream(stream(), ping=10)

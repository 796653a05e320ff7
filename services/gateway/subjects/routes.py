"""HTTP for subjects: a person's photos in, their LoRA out, and everything forgotten on DELETE."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sse_starlette import EventSourceResponse, ServerSentEvent

from services.gateway.datasets.ingest import IngestLimits
from services.gateway.db.models import Subject, SubjectEvent, utcnow
from services.gateway.deps import SessionDep, StateDep, TenantDep
from services.gateway.multipart import (
    FORM_OVERHEAD_BYTES,
    multipart_body,
    parse_fields,
    read_multipart,
)
from services.gateway.problems import PROBLEM_RESPONSES
from services.gateway.subjects import service
from services.gateway.subjects.forget import finish_subject_deletion, start_subject_deletion
from services.gateway.subjects.schemas import (
    ACTIVE_STATUSES,
    MAX_PHOTOS,
    MIN_PHOTOS,
    SubjectFields,
    SubjectOut,
    SubjectPage,
    SubjectStreamEvent,
)
from shared.errors import ValidationFailed

router = APIRouter(prefix="/v1/subjects", tags=["subjects"], responses=PROBLEM_RESPONSES)

_LIMITS = IngestLimits()
_BODY_LIMIT = _LIMITS.max_total_bytes + FORM_OVERHEAD_BYTES + 512 * (MAX_PHOTOS + 10)
# How long a DELETE waits for the jobs it cancels to stop before answering 202 (the rest of
# the deletion then finishes in the background).
DELETE_WAIT_S = 20.0


@router.post(
    "", response_model=SubjectOut, status_code=202, summary="Create a subject from photos",
    openapi_extra=multipart_body({
        "photos": {"type": "array", "items": {"type": "string", "format": "binary"},
                   "description": "3 to 50 photos of the person (PNG, JPEG, WebP, BMP)."},
        **SubjectFields.model_json_schema()["properties"],
    }, required=["name", "class_word", "consent", "photos"]),
)
async def create_subject(request: Request, session: SessionDep, tenant: TenantDep,
                         state: StateDep) -> SubjectOut:
    """One call: the photos are checked (real images, bomb-safe, duplicates reported) and
    stored as the subject's dataset, then captioned (``caption=true``) and trained into a
    LoRA. Follow it on `GET /v1/subjects/{id}/events`. Unless ``retain_photos``, the photos and
    everything derived from them are deleted once it is finished."""
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        # what a form with its text fields and no files is sent as: the photos are missing
        raise ValidationFailed([{"field": "photos", "message": f"send {MIN_PHOTOS} to "
                                 f"{MAX_PHOTOS} photos as multipart/form-data files (got none)"}])
    async with read_multipart(request, max_bytes=_BODY_LIMIT, file_field="photos",
                              max_files=MAX_PHOTOS + 10) as form:
        fields = parse_fields(SubjectFields, form, file_fields=("photos",))
        with contextlib.ExitStack() as opened:
            photos = [(part.filename, opened.enter_context(part.open()))
                      for part in form.files_of("photos")]
            subject = await service.create_subject(session=session, state=state, tenant=tenant,
                                                   fields=fields, photos=photos)
    subject_id = subject.id
    state.wake_subjects([subject_id])
    async with state.sessionmaker() as fresh:
        row = await fresh.get(Subject, subject_id)
        assert row is not None
        return await service.subject_out(fresh, row)


@router.get("", response_model=SubjectPage, summary="List subjects, newest first")
async def list_subjects(session: SessionDep, tenant: TenantDep,
                        limit: Annotated[int, Query(ge=1, le=100)] = 20,
                        cursor: str | None = None) -> SubjectPage:
    return await service.page_subjects(session=session, tenant=tenant, limit=limit, cursor=cursor)


@router.get("/{subject_id}", response_model=SubjectOut, summary="A subject and its lineage")
async def get_subject(subject_id: str, session: SessionDep, tenant: TenantDep) -> SubjectOut:
    subject = await service.get_subject(session=session, tenant=tenant, subject_id=subject_id)
    return await service.subject_out(session, subject)


@router.post("/{subject_id}/cancel", response_model=SubjectOut, status_code=202,
             summary="Stop whichever stage runs")
async def cancel_subject(subject_id: str, session: SessionDep, tenant: TenantDep,
                         state: StateDep) -> SubjectOut:
    """409 when the subject is finished. A queued stage ends at once; a running one at the
    worker's next step, and the subject then reads ``canceled``."""
    subject = await service.get_subject(session=session, tenant=tenant, subject_id=subject_id)
    await service.request_cancel(session=session, state=state, tenant=tenant, subject=subject)
    state.wake_subjects([subject_id])
    await session.refresh(subject)
    return await service.subject_out(session, subject)


@router.delete(
    "/{subject_id}", status_code=204, summary="Forget a subject",
    responses={202: {"model": SubjectOut, "description": "Deletion under way (a job using the "
                     "subject is still stopping); it finishes on its own."}})
async def delete_subject(
    subject_id: str, session: SessionDep, tenant: TenantDep, state: StateDep,
    outputs: Annotated[bool, Query(description="Also delete every output made with the "
                                   "subject's LoRA (images and manifests).")] = False,
) -> Response:
    """Removes the photos, the dataset and its items, captions and tags, tagging and training
    artifacts, every LoRA version (rows and files, evicted from every worker's cache) and, with
    ``outputs=true``, every output made with it; jobs using it are canceled first. Resumable:
    interrupted, the subject stays ``deleting`` and finishing it is retried until done."""
    subject = await service.get_subject(session=session, tenant=tenant, subject_id=subject_id)
    await start_subject_deletion(session=session, state=state, subject=subject, outputs=outputs)
    await session.close()
    deadline = asyncio.get_running_loop().time() + DELETE_WAIT_S
    while not await finish_subject_deletion(state, subject_id):
        if asyncio.get_running_loop().time() > deadline:
            async with state.sessionmaker() as fresh:
                row = await fresh.get(Subject, subject_id)
                if row is None:
                    break
                body = await service.subject_out(fresh, row)
            return JSONResponse(body.model_dump(mode="json"), status_code=202)
        await asyncio.sleep(0.25)
    return Response(status_code=204)


@router.get(
    "/{subject_id}/events", summary="Follow the whole chain (Server-Sent Events)",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {
        "type": "string", "description": "Messages whose `data` is a SubjectStreamEvent: "
        + json.dumps(SubjectStreamEvent.model_json_schema()["properties"]["type"])}}},
        "description": "Stage events (with an `id`: send the last as `Last-Event-ID` to "
                       "resume) and progress events of the stage under way."}},
)
async def subject_events(
    subject_id: str, session: SessionDep, tenant: TenantDep, state: StateDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """One stream over every stage: each stage change (``captioning``, ``training``, ``ready``,
    ``photos_deleted``, …) and the progress of the stage's job; it ends when the subject is
    finished (after its photos are deleted, when they are not kept)."""
    await service.get_subject(session=session, tenant=tenant, subject_id=subject_id)
    await session.close()
    after = (int(last_event_id) if last_event_id and last_event_id.isascii()
             and last_event_id.isdigit() else 0)  # `²` is a digit to isdigit, not to int
    after = min(after, 2**31 - 1)

    async def stream() -> AsyncIterator[ServerSentEvent]:
        seq, progress, finished_at = after, -1.0, None
        loop = asyncio.get_running_loop()
        while True:
            async with state.sessionmaker() as fresh:
                subject = await fresh.get(Subject, subject_id)
                if subject is None:
                    yield ServerSentEvent(event="deleted", data=json.dumps(
                        {"subject_id": subject_id, "seq": None, "type": "deleted",
                         "stage": "deleting", "at": utcnow().isoformat(), "data": {}}))
                    return
                rows = list(await fresh.scalars(
                    select(SubjectEvent).where(SubjectEvent.subject_id == subject_id,
                                               SubjectEvent.seq > seq)
                    .order_by(SubjectEvent.seq)))
                for row in rows:
                    seq = row.seq
                    body = SubjectStreamEvent(subject_id=subject_id, seq=row.seq, type=row.type,
                                              stage=row.stage, at=row.at, data=row.data)
                    yield ServerSentEvent(event=row.type, id=str(row.seq),
                                          data=body.model_dump_json())
                if subject.status in ACTIVE_STATUSES:
                    now = await service.subject_out(fresh, subject)
                    if now.progress != progress:
                        progress = now.progress
                        body = SubjectStreamEvent(
                            subject_id=subject_id, seq=None, type="progress",
                            stage=subject.status, at=utcnow(),
                            data={"progress": progress, "job_id": service.current_job_id(subject)})
                        yield ServerSentEvent(event="progress", data=body.model_dump_json())
                elif subject.status != "deleting":
                    finished_at = finished_at or loop.time()
                    # wait for the photos' deletion, which follows the end (bounded)
                    if (subject.retain_photos or subject.purged is not None
                            or loop.time() - finished_at > 60):
                        return
            await state.subject_news.wait(0.5)  # woken by this gateway's changes

    return EventSourceResponse(stream(), ping=15)

"""Subjects: a person's photos become their LoRA through one resource with a lifecycle.

The chain (photos -> dataset -> optional tagging -> training -> LoRA) moves on job outcomes:
:func:`on_job_finished` runs inside the transaction that applies a tagging or training job's
terminal event, so the subject's stage changes exactly when the job's does. What cannot run in
that transaction (submitting the next job, deleting photos) is done after the commit by
:mod:`services.gateway.subjects.chain`, which also re-checks every unfinished subject on start
and every few seconds, so a gateway killed between two stages loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.datasets.ingest import IMAGE_EXTENSIONS, IngestLimits, Upload, ingest
from services.gateway.datasets.service import create_dataset
from services.gateway.db.models import (
    Job,
    JobLora,
    Lora,
    Subject,
    SubjectEvent,
    Tenant,
    WebhookDelivery,
    WebhookEndpoint,
    new_id,
    utcnow,
)
from services.gateway.pagination import encode_cursor, newest_first
from services.gateway.subjects.presets import REPEATS, training_options
from services.gateway.subjects.schemas import (
    ACTIVE_STATUSES,
    MAX_PHOTOS,
    MIN_PHOTO_SIDE,
    MIN_PHOTOS,
    SmallPhoto,
    SubjectFields,
    SubjectOut,
    SubjectPage,
    SubjectStage,
)
from services.gateway.webhooks.service import DELIVERIES_QUEUED, filter_matches
from shared.errors import Conflict, NotFound, ValidationFailed
from shared.events import JobEvent
from shared.outcomes import Succeeded, TrainingSucceeded
from shared.specs import JobKind, JobStatus
from shared.training import TrainingSpec

# session.info key: subjects whose chain must move once the transaction commits
ADVANCE = "loomis.subjects_to_advance"
_CONSONANTS, _VOWELS = "bcdfghjklmnpqrstvwxz", "aeiou"


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed([{"field": field, "message": message}])


def rare_token() -> str:
    """A made-up word (``zovek``-like): CLIP splits it into rare pieces with little meaning of
    their own, so training gives it the subject's, as ``sks`` and ``ohwx`` are used."""
    letters = [secrets.choice(_CONSONANTS if i % 2 == 0 else _VOWELS) for i in range(5)]
    return "".join(letters) + secrets.choice("kxzvq")


async def _unique_token(session: AsyncSession, tenant: Tenant, wanted: str | None) -> str:
    taken = {token.lower() for token in await session.scalars(
        select(Subject.token).where(Subject.tenant_id == tenant.id))}
    if wanted is not None:
        if wanted in taken:
            raise _invalid("token", f"another of your subjects uses the token {wanted!r}; a "
                           "trigger must name one subject")
        return wanted
    while (token := rare_token()) in taken:
        pass
    return token


def _photo_name(index: int, filename: str | None, folder: str) -> str:
    """The photo's place in the subject's one kohya folder; its extension kept when it is an
    image's (the content decides the format either way)."""
    suffix = ("." + filename.rsplit(".", 1)[-1].lower()) if filename and "." in filename else ""
    return f"{folder}/photo-{index:02d}{suffix if suffix in IMAGE_EXTENSIONS else '.png'}"


def _photo_index(path: str) -> int:
    """The photo's index in the request, from the name :func:`_photo_name` gave it."""
    return int(path.rsplit("/photo-", 1)[-1].split(".", 1)[0])


def _as_photos_field(exc: ValidationFailed) -> ValidationFailed:
    """Dataset checks name ``files[i]``; here the field is ``photos``, in ``errors`` and in
    the detail (which named ``files[i]`` beside errors naming ``photos[i]``)."""
    errors = []
    for error in exc.errors:
        field = str(error.get("field", ""))
        errors.append({**error, "field": "photos" + field.removeprefix("files")}
                      if field.startswith("files") else error)
    renamed = ValidationFailed(errors)
    renamed.status, renamed.code, renamed.title = exc.status, exc.code, exc.title
    return renamed


def _check_trainable(state: Any, fields: SubjectFields, options: dict[str, Any]) -> None:
    """What the training's submission refuses before reading a photo (a base model that is
    not here or not SD1.5, an optimizer the trainers lack), refused now: otherwise the
    subject was a 202, its photos stored, and it failed at its training stage. Named
    ``overrides.<field>`` when an override chose it, else ``preset``."""
    from services.gateway.trainings.service import check_trainable

    try:
        check_trainable(state=state, spec=TrainingSpec.model_validate(
            {**options, "name": "subject", "dataset_id": "subject"}))
    except ValidationFailed as exc:
        errors = []
        for error in exc.errors:
            value: Any = fields.overrides or {}
            for key in str(error["field"]).split("."):
                value = value.get(key) if isinstance(value, dict) else None
            named = f"overrides.{error['field']}" if value is not None else "preset"
            errors.append({**error, "field": named})
        raise ValidationFailed(errors) from exc


async def create_subject(
    *, session: AsyncSession, state: Any, tenant: Tenant, fields: SubjectFields,
    photos: Sequence[tuple[str | None, Upload]],
) -> Subject:
    """Check everything (fields, options, every photo) before storing anything, then store the
    photos as the subject's dataset and the subject in one transaction."""
    if not MIN_PHOTOS <= len(photos) <= MAX_PHOTOS:
        raise _invalid("photos", f"send {MIN_PHOTOS} to {MAX_PHOTOS} photos (got {len(photos)})")
    options = training_options(fields.preset, fields.overrides or {})
    _check_trainable(state, fields, options)
    if fields.token is not None and fields.token.lower() in fields.class_word.lower().split():
        raise _invalid("token", "the token must differ from the class word")
    webhook = None
    if fields.webhook is not None:
        from services.gateway.webhooks.service import check_target_url

        await check_target_url(fields.webhook.url, settings=state.settings, field="webhook.url")
        webhook = {"url": fields.webhook.url, "events": list(fields.webhook.events)}
    token = await _unique_token(session, tenant, fields.token)
    folder = f"{REPEATS[fields.preset]}_{token} {fields.class_word}"
    named = [(_photo_name(i, filename, folder), data) for i, (filename, data) in enumerate(photos)]
    resolution = options["data"]["resolution"]
    limits = IngestLimits(min_side=min(resolution) if isinstance(resolution, list) else int(resolution))
    try:
        checked = await asyncio.to_thread(ingest, files=named, zips=[],
                                          caption_extensions=(".caption",), limits=limits)
    except ValidationFailed as exc:
        raise _as_photos_field(exc) from exc
    tiny = [{"field": f"photos[{_photo_index(item.path)}]", "message": f"the photo is "
             f"{item.width}x{item.height}; a photo needs at least {MIN_PHOTO_SIDE} px on its "
             "short side to show a face"}
            for item in checked.items if min(item.width, item.height) < MIN_PHOTO_SIDE]
    if tiny:
        raise ValidationFailed(tiny)
    if len(checked.items) < MIN_PHOTOS:
        raise _invalid("photos", f"only {len(checked.items)} distinct photo(s): "
                       f"{len(checked.duplicates)} are copies of another; send at least "
                       f"{MIN_PHOTOS} different photos")
    subject = Subject(
        id=new_id(), tenant_id=tenant.id, name=fields.name, class_word=fields.class_word,
        token=token, preset=fields.preset, training=options, overrides=fields.overrides or {},
        caption=fields.caption, retain_photos=fields.retain_photos, consent=fields.consent,
        webhook=webhook, status="preparing", progress=0.0, cancel_requested=False,
        photos=len(checked.items),
        duplicates=[{"kept": kept.rsplit("/", 1)[-1], "dropped": dropped.rsplit("/", 1)[-1]}
                    for kept, dropped in checked.duplicates],
        small_photos=[{"photo": _photo_index(item.path), "width": item.width,
                       "height": item.height} for item in checked.items if "small" in item.flags],
        trigger_words=[f"{token} {fields.class_word}"], last_seq=0, created_at=utcnow(),
        updated_at=utcnow())
    subject.dataset_id = new_id()
    session.add(subject)
    await record_event(session, subject, "preparing", data={"photos": subject.photos})
    try:
        await create_dataset(
            session=session, store=state.store, tenant=tenant, name=f"subject {token}",
            files=named, zips=[], caption_extension=".caption",
            min_side=limits.min_side, dataset_id=subject.dataset_id, checked=checked)
    except ValidationFailed as exc:
        raise _as_photos_field(exc) from exc
    except IntegrityError as exc:  # a concurrent subject took the token first
        raise _invalid("token", f"another of your subjects uses the token {token!r}") from exc
    return subject


async def get_subject(*, session: AsyncSession, tenant: Tenant, subject_id: str) -> Subject:
    """Another tenant's subject is missing, not forbidden: its existence is private."""
    subject = await session.scalar(select(Subject).where(Subject.id == subject_id,
                                                         Subject.tenant_id == tenant.id))
    if subject is None:
        raise NotFound(f"subject {subject_id} not found", code="subject_not_found")
    return subject


async def locked_subject(session: AsyncSession, subject_id: str) -> Subject | None:
    """The subject as committed now, its row locked to the end of the transaction: every
    writer (the event consumer, cancel, delete, the chain) re-reads it this way before a stage
    change, so two never build on the same stale state (PostgreSQL row lock; on SQLite the
    writers hold the process's write lock and SQLite has one writer)."""
    return await session.scalar(select(Subject).where(Subject.id == subject_id)
                                .with_for_update().execution_options(populate_existing=True))


def current_job_id(subject: Subject) -> str | None:
    return {"captioning": subject.tagging_job_id,
            "training": subject.training_job_id}.get(subject.status)


async def subjects_out(session: AsyncSession, subjects: Sequence[Subject], *,
                       outputs_limit: int = 100) -> list[SubjectOut]:
    """The subjects as the API shows them, lineage included, in five queries whatever their
    number (a page of 100 subjects took five per subject); outputs newest first, at most
    ``outputs_limit`` listed per subject."""
    ids = [subject.id for subject in subjects]
    if not ids:
        return []
    loras: dict[str, list[Lora]] = {subject_id: [] for subject_id in ids}
    for lora in await session.scalars(select(Lora).where(Lora.subject_id.in_(ids))
                                      .order_by(Lora.created_at, Lora.id)):
        loras[str(lora.subject_id)].append(lora)
    own = {job_id for subject in subjects
           for job_id in (subject.tagging_job_id, subject.training_job_id) if job_id}
    jobs = {row.id: row for row in (await session.execute(
        select(Job.id, Job.kind, Job.status, Job.progress).where(Job.id.in_(own)))).all()}
    ranked = (select(JobLora.subject_id, Job.id, Job.kind, Job.status, Job.created_at,
                     func.row_number().over(partition_by=JobLora.subject_id,
                                            order_by=(Job.created_at.desc(), Job.id.desc()))
                     .label("rank"))
              .join(JobLora, JobLora.job_id == Job.id).where(JobLora.subject_id.in_(ids))
              .subquery())
    outputs: dict[str, list[Any]] = {subject_id: [] for subject_id in ids}
    for row in (await session.execute(select(ranked).where(ranked.c.rank <= outputs_limit)
                                      .order_by(ranked.c.rank))).all():
        outputs[row.subject_id].append(row)
    totals = dict((await session.execute(
        select(JobLora.subject_id, func.count()).where(JobLora.subject_id.in_(ids))
        .group_by(JobLora.subject_id))).tuples().all())
    return [_subject_out(subject, loras=loras[subject.id], jobs=jobs,
                         outputs=outputs[subject.id], outputs_total=int(totals.get(subject.id, 0)))
            for subject in subjects]


async def subject_out(session: AsyncSession, subject: Subject) -> SubjectOut:
    return (await subjects_out(session, [subject]))[0]


def _subject_out(subject: Subject, *, loras: list[Lora], jobs: dict[str, Any],
                 outputs: list[Any], outputs_total: int) -> SubjectOut:
    job_id = current_job_id(subject)
    progress = (1.0 if subject.status == "ready" else
                float(jobs[job_id].progress or 0.0) if job_id in jobs else 0.0)
    stage = (SubjectStage(name=subject.status, job_id=job_id, progress=progress)
             if subject.status in ACTIVE_STATUSES else None)
    own = [job_id for job_id in (subject.tagging_job_id, subject.training_job_id) if job_id]
    lineage = {
        "dataset_id": subject.dataset_id if subject.purged is None else None,
        "jobs": [{"id": job_id, "kind": jobs[job_id].kind, "status": jobs[job_id].status}
                 for job_id in own if job_id in jobs],
        "loras": [{"id": lora.id, "name": lora.name, "version": 1, "sha256": lora.sha256,
                   "created_at": lora.created_at.isoformat()} for lora in loras],
        "outputs": [{"job_id": row.id, "kind": row.kind, "status": row.status,
                     "created_at": row.created_at.isoformat()} for row in outputs],
        "outputs_total": outputs_total,
    }
    base = f"/v1/subjects/{subject.id}"
    return SubjectOut(
        id=subject.id, name=subject.name, status=subject.status,
        class_word=subject.class_word, token=subject.token,
        trigger_words=list(subject.trigger_words), preset=subject.preset,
        training=subject.training, caption=subject.caption, retain_photos=subject.retain_photos,
        consent=subject.consent, photos=subject.photos, duplicates=list(subject.duplicates),
        small_photos=[SmallPhoto(**photo) for photo in subject.small_photos or []],
        stage=stage, progress=progress, dataset_id=subject.dataset_id,
        tagging_job_id=subject.tagging_job_id, training_job_id=subject.training_job_id,
        lora_id=subject.lora_id,
        error=({"code": subject.error_code, "message": subject.error_message or ""}
               if subject.error_code else None),
        purged=subject.purged, lineage=lineage,
        created_at=subject.created_at, finished_at=subject.finished_at,
        links={"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel"})


async def page_subjects(*, session: AsyncSession, tenant: Tenant, limit: int,
                        cursor: str | None) -> SubjectPage:
    query = newest_first(select(Subject).where(Subject.tenant_id == tenant.id),
                         Subject.created_at, Subject.id, limit=limit, cursor=cursor)
    rows = list(await session.scalars(query))
    more = len(rows) > limit
    rows = rows[:limit]
    return SubjectPage(items=await subjects_out(session, rows),
                       next_cursor=encode_cursor(rows[-1].created_at, rows[-1].id)
                       if more and rows else None)


async def record_event(session: AsyncSession, subject: Subject, event_type: str, *,
                       data: dict[str, Any] | None = None) -> None:
    """A stage change, in the subject's timeline and to its webhooks, in the caller's
    transaction (so the two exist exactly when the change does)."""
    subject.last_seq += 1
    now = utcnow()
    subject.updated_at = now
    seq = subject.last_seq
    session.add(SubjectEvent(subject_id=subject.id, seq=seq, type=event_type,
                             stage=subject.status, at=now, data=data or {}))
    targets: list[tuple[str | None, str]] = [
        (row.id, row.url) for row in (await session.execute(
            select(WebhookEndpoint.id, WebhookEndpoint.url, WebhookEndpoint.events).where(
                WebhookEndpoint.tenant_id == subject.tenant_id,
                WebhookEndpoint.enabled.is_(True)))).all()
        if any(p.startswith("subject.")
               and filter_matches(p, kind="subject", event_type=event_type) for p in row.events)]
    wanted = set((subject.webhook or {}).get("events") or ["*"])
    if "succeeded" in wanted:
        wanted.add("ready")
    if subject.webhook and ("*" in wanted or event_type in wanted):
        targets.append((None, subject.webhook["url"]))
    if not targets:
        return
    session.info[DELIVERIES_QUEUED] = True
    await session.execute(insert(WebhookDelivery), [
        {"id": new_id(), "tenant_id": subject.tenant_id, "endpoint_id": endpoint_id,
         "job_id": None, "subject_id": subject.id, "url": url,
         "event_type": f"subject.{event_type}",
         "event_id": f"msg_{subject.id}_{seq}" + (f"_{endpoint_id}" if endpoint_id else ""),
         "seq": seq, "status": "pending", "attempts": 0, "next_attempt_at": now,
         "last_attempt_at": None, "created_at": now, "updated_at": now}
        for endpoint_id, url in targets])


def _advance_later(session: AsyncSession, subject: Subject) -> None:
    session.info.setdefault(ADVANCE, set()).add(subject.id)


async def move(session: AsyncSession, subject: Subject, status: str, *,
               data: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> None:
    """Change the subject's stage and record it; the chain takes it from there after commit."""
    subject.status = status
    subject.progress = 1.0 if status == "ready" else 0.0
    if status in ("ready", "failed", "canceled"):
        subject.finished_at = utcnow()
    if error is not None:
        subject.error_code = str(error.get("code") or "stage_failed")
        subject.error_message = str(error.get("message") or "")
    await record_event(session, subject, status, data=data)
    _advance_later(session, subject)


async def on_job_finished(session: AsyncSession, job: Job, event: JobEvent,
                          outcome: Succeeded | None) -> None:
    """A tagging or training job of a subject ended: the subject's next stage, in the event's
    own transaction."""
    if JobKind(job.kind) not in (JobKind.TAGGING, JobKind.TRAINING):
        return
    # A stage's job is submitted under the Idempotency-Key ``subject:<id>:<stage>``: it names
    # its subject even when it ends before the subject has recorded its id.
    key = job.idempotency_key or ""
    if not key.startswith("subject:"):
        return
    subject = await locked_subject(session, key.split(":")[1])
    if subject is None:
        return
    if subject.status == "deleting":
        # a training that finished as the subject was being deleted: its LoRA goes too
        lora = outcome.register_lora if isinstance(outcome, TrainingSucceeded) else None
        row = await session.get(Lora, lora.id) if lora is not None else None
        if row is not None:
            row.subject_id = subject.id
            plan = dict(subject.deletion or {})
            plan["loras"] = [*plan.get("loras", []), {"id": row.id, "sha256": row.sha256}]
            subject.deletion = plan
        return
    if subject.status not in ACTIVE_STATUSES:
        return
    column = "tagging_job_id" if job.kind == JobKind.TAGGING.value else "training_job_id"
    if getattr(subject, column) is None:
        setattr(subject, column, job.id)
    elif getattr(subject, column) != job.id:
        return
    stage = subject.status
    if event.status is JobStatus.SUCCEEDED:
        if subject.cancel_requested and job.kind == JobKind.TAGGING.value:
            await move(session, subject, "canceled", data={"stage": stage})
        elif job.kind == JobKind.TAGGING.value:
            await move(session, subject, "training", data={"tagging_job_id": job.id})
        else:
            assert isinstance(outcome, TrainingSucceeded)
            lora = outcome.register_lora
            if lora is None:
                await move(session, subject, "failed", error={
                    "code": "no_lora", "message": "the training registered no LoRA"})
                return
            row = await session.get(Lora, lora.id)  # registered in this very transaction
            if row is not None:
                row.subject_id = subject.id
            subject.lora_id = lora.id
            subject.trigger_words = [f"{subject.token} {subject.class_word}"]
            # A cancel that came after the training's last step is too late: the LoRA exists
            # and is the subject's (so DELETE /v1/subjects/{id} removes it), never an orphan.
            await move(session, subject, "ready", data={
                "lora_id": lora.id, "trigger_words": subject.trigger_words,
                "training_job_id": job.id,
                **({"cancel": "asked for after the training finished"}
                   if subject.cancel_requested else {})})
        return
    error = event.data.get("error") if isinstance(event.data.get("error"), dict) else None
    if event.status is JobStatus.CANCELED or subject.cancel_requested:
        await move(session, subject, "canceled", data={"stage": stage, "job_id": job.id})
    else:
        await move(session, subject, "failed", data={"stage": stage, "job_id": job.id},
                   error={"code": (error or {}).get("code", f"{stage}_failed"),
                          "message": f"the {stage} job {job.id} failed: "
                                     f"{(error or {}).get('message', '')}"})


async def request_cancel(*, session: AsyncSession, state: Any, tenant: Tenant,
                         subject: Subject) -> None:
    """Stop whichever stage runs: its job is canceled (at once when queued, at the worker's
    next step when running) and the subject ends ``canceled`` when the job does."""
    from services.gateway.jobs.service import cancel_job

    subject_id = subject.id
    async with state.write_lock:
        fresh = await locked_subject(session, subject_id)
        if fresh is None:
            raise NotFound(f"subject {subject_id} not found", code="subject_not_found")
        if fresh.status not in ACTIVE_STATUSES:
            status = fresh.status
            await session.rollback()  # (expires the loaded rows: nothing of them is read after)
            raise Conflict(f"subject {subject_id} is {status}", code="subject_finished")
        fresh.cancel_requested = True
        job_id = current_job_id(fresh)
        if job_id is None:
            await move(session, fresh, "canceled", data={"stage": fresh.status})
        await session.commit()
    if job_id is not None:
        with contextlib.suppress(Conflict):  # finished meanwhile: its event moves the subject
            async with state.write_lock:
                await cancel_job(session=session, events=state.events, tenant=tenant,
                                 job_id=job_id)


async def subject_loras(session: AsyncSession, tenant: Tenant, subject_id: str, *,
                        field: str) -> Subject:
    """A subject named in a generation or scene: the tenant's, and ready."""
    subject = await session.scalar(select(Subject).where(Subject.id == subject_id,
                                                         Subject.tenant_id == tenant.id))
    if subject is None:
        raise _invalid(field, f"no subject {subject_id!r}")
    if subject.status != "ready" or subject.lora_id is None:
        raise _invalid(field, f"subject {subject_id} is {subject.status}, not ready")
    return subject


async def subject_triggers(session: AsyncSession, subject_id: str) -> list[str]:
    words = await session.scalar(select(Subject.trigger_words).where(Subject.id == subject_id))
    return list(words or [])


def with_triggers(prompt: str, triggers: Sequence[str]) -> str:
    """The prompt with the subject's trigger words first, unless it has them already."""
    missing = [t for t in triggers if t and t.lower() not in prompt.lower()]
    return ", ".join([*missing, prompt]) if missing else prompt

"""Forgetting: every trace of a LoRA or a subject removed, resumably.

A deletion first commits what it must remove (the subject in ``deleting`` with its plan, or a
:class:`LoraDeletion` row) and deletes the LoRA rows, so no new job can use them; every later
step is idempotent and re-run by the chain's sweeper until the plan is done, so a gateway
killed half-way finishes on its next start. The steps, in order: cancel the jobs still using
it (and wait for them to stop, so none writes an output after its prefix is gone), delete the
objects, scrub Redis (task payloads, event streams), delete the rows, then tell the workers
(:mod:`shared.evictions`), whose cached files and loaded adapters go last.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.db.models import (
    Artifact,
    Dataset,
    DatasetItem,
    Job,
    JobLora,
    Lora,
    LoraDeletion,
    Subject,
    Tenant,
    WebhookDelivery,
    utcnow,
)
from shared.events import PENDING_JOBS, cancel_key, job_stream_key, pending_key, state_key
from shared.evictions import record_lora_eviction
from shared.keys import (
    dataset_prefix,
    job_prefix,
    lora_prefix,
    tagging_prefix,
    training_prefix,
)
from shared.specs import TERMINAL_STATUSES, JobStatus

logger = logging.getLogger(__name__)

_TERMINAL = [s.value for s in TERMINAL_STATUSES]
_ARQ_KEYS = ("arq:job:", "arq:result:", "arq:in-progress:", "arq:retry:")


async def count_and_delete(store: Any, prefixes: Iterable[str]) -> int:
    """Delete every object under ``prefixes``; returns how many there were."""
    removed = 0
    for prefix in prefixes:
        removed += len(await store.list(prefix))
        await store.delete_prefix(prefix)
    return removed


async def scrub_redis(redis: Any, *, stream: str, dead_letter: str, job_ids: set[str]) -> int:
    """Remove these jobs from Redis: their queued task payloads (which name datasets, keys and
    captions), their live state and streams, and their entries in the shared event streams
    (a tagging job's carries every caption). Returns the entries removed."""
    if not job_ids:
        return 0
    keys = [f"{prefix}{job_id}" for job_id in job_ids for prefix in _ARQ_KEYS]
    keys += [key for job_id in job_ids
             for key in (state_key(job_id), job_stream_key(job_id), cancel_key(job_id),
                         pending_key(job_id))]
    removed = int(await redis.delete(*keys))
    await redis.zrem(PENDING_JOBS, *job_ids)  # ids in the queue recovery's index
    for name in (stream, dead_letter):
        last = "-"
        while True:
            entries = await redis.xrange(name, min=last, max="+", count=1000)
            doomed = []
            for entry_id, fields in entries:
                text = b" ".join(v if isinstance(v, bytes) else str(v).encode()
                                 for v in fields.values())
                if any(job_id.encode() in text for job_id in job_ids):
                    doomed.append(entry_id)
            if doomed:
                removed += int(await redis.xdel(name, *doomed))
            if len(entries) < 1000:
                break
            last_id = entries[-1][0]
            last = "(" + (last_id.decode() if isinstance(last_id, bytes) else str(last_id))
    return removed


async def _active(session: AsyncSession, job_ids: set[str]) -> list[str]:
    if not job_ids:
        return []
    return list(await session.scalars(select(Job.id).where(Job.id.in_(job_ids),
                                                           Job.status.not_in(_TERMINAL))))


async def stop_jobs(state: Any, session: AsyncSession, job_ids: set[str]) -> list[str]:
    """Ask every still-active job among ``job_ids`` to stop (a queued one is canceled at once);
    returns those still running."""
    from services.gateway.jobs.service import apply_event

    running = await _active(session, job_ids)
    for job_id in running:
        await state.events.request_cancel(job_id)
        transition = await state.events.emit(
            job_id, "canceled", allowed_from=(JobStatus.QUEUED,), to=JobStatus.CANCELED,
            data={"reason": "what it uses is being deleted"})
        async with state.write_lock:
            await session.execute(update(Job).where(Job.id == job_id)
                                  .values(cancel_requested=True))
            if transition.event is not None:
                await apply_event(session=session, event=transition.event)
            await session.commit()
    return await _active(session, job_ids)


async def _lineage_jobs(session: AsyncSession, lora_ids: list[str]) -> set[str]:
    if not lora_ids:
        return set()
    return set(await session.scalars(select(JobLora.job_id).where(JobLora.lora_id.in_(lora_ids))))


async def _delete_jobs(session: AsyncSession, job_ids: set[str]) -> None:
    if job_ids:
        await session.execute(delete(WebhookDelivery).where(WebhookDelivery.job_id.in_(job_ids)))
        await session.execute(delete(JobLora).where(JobLora.job_id.in_(job_ids)))
        await session.execute(delete(Artifact).where(Artifact.job_id.in_(job_ids)))
        for job in await session.scalars(select(Job).where(Job.id.in_(job_ids))):
            await session.delete(job)  # its events go with it (ON DELETE CASCADE)


async def _delete_dataset(session: AsyncSession, dataset_id: str | None) -> None:
    if dataset_id:
        await session.execute(delete(DatasetItem).where(DatasetItem.dataset_id == dataset_id))
        await session.execute(delete(Dataset).where(Dataset.id == dataset_id))


async def start_subject_deletion(*, session: AsyncSession, state: Any, subject: Subject,
                                 outputs: bool) -> None:
    """Commit the plan and take the LoRA away; :func:`finish_subject_deletion` does the rest.
    A second DELETE while one runs only widens it (``outputs``)."""
    from services.gateway.subjects.service import locked_subject

    async with state.write_lock:
        # re-read under the lock: a concurrent DELETE may have committed its plan (and taken
        # the LoRA rows) since this request loaded the subject
        fresh = await locked_subject(session, subject.id)
        if fresh is None:
            return
        subject = fresh
        plan = dict(subject.deletion or {})
        loras = list(await session.scalars(select(Lora).where(Lora.subject_id == subject.id)))
        known = {lora["id"]: lora for lora in plan.get("loras", [])}
        known.update({lora.id: {"id": lora.id, "sha256": lora.sha256} for lora in loras})
        plan["loras"] = list(known.values())
        plan["outputs"] = bool(plan.get("outputs")) or outputs
        plan.setdefault("started_at", utcnow().isoformat())
        plan.setdefault("was", subject.status)
        subject.deletion = plan
        subject.status = "deleting"
        subject.cancel_requested = True
        for lora in loras:
            await session.delete(lora)
        await session.commit()


async def finish_subject_deletion(state: Any, subject_id: str) -> bool:
    """One pass over a subject in ``deleting``; True once nothing of it is left."""
    async with state.sessionmaker() as session:
        subject = await session.get(Subject, subject_id)
        if subject is None:
            return True
        plan = dict(subject.deletion or {})
        tenant_id = subject.tenant_id
        lora_ids = [lora["id"] for lora in plan.get("loras", [])]
        own = {job_id for job_id in (subject.tagging_job_id, subject.training_job_id) if job_id}
        made = await _lineage_jobs(session, lora_ids)
        made |= set(await session.scalars(select(JobLora.job_id)
                                          .where(JobLora.subject_id == subject_id)))
        if await stop_jobs(state, session, own | made):
            return False  # a job still runs: it could write after its outputs are gone
        # read again now that every job has stopped: a training that finished meanwhile
        # added its LoRA to the plan (see subjects.service.on_job_finished)
        await session.refresh(subject)
        plan = dict(subject.deletion or {})
        lora_ids = [lora["id"] for lora in plan.get("loras", [])]
        made = await _lineage_jobs(session, lora_ids) | set(await session.scalars(
            select(JobLora.job_id).where(JobLora.subject_id == subject_id)))
        if made - own and await stop_jobs(state, session, made):
            return False
        outputs = made if plan.get("outputs") else set()
        removed = await count_and_delete(state.store, _prefixes(
            tenant_id, subject.dataset_id, own, lora_ids, outputs))
        scrubbed = await scrub_redis(
            state.redis, stream=state.settings.redis.events_stream,
            dead_letter=state.settings.redis.events_dead_letter_stream,
            job_ids=own | outputs | {subject_id, *lora_ids})
        async with state.write_lock:
            from services.gateway.subjects.service import locked_subject

            fresh = await locked_subject(session, subject_id)
            if fresh is None:
                return True
            if {fresh.tagging_job_id, fresh.training_job_id} - own - {None}:
                await session.rollback()  # a stage job was recorded since: the next pass
                return False
            await session.execute(delete(WebhookDelivery)
                                  .where(WebhookDelivery.subject_id == subject_id))
            await _delete_jobs(session, own | outputs)
            await session.execute(delete(JobLora).where(or_(
                JobLora.subject_id == subject_id, JobLora.lora_id.in_(lora_ids or [""]))))
            await _delete_dataset(session, subject.dataset_id)
            await session.execute(delete(Lora).where(Lora.subject_id == subject_id))
            await session.delete(subject)
            await session.commit()
    for lora in plan.get("loras", []):
        await record_lora_eviction(state.redis, sha256=lora["sha256"])
    logger.info("subject deleted: %d objects, %d Redis entries", removed, scrubbed)
    return True


def _prefixes(tenant_id: str, dataset_id: str | None, own: set[str], lora_ids: list[str],
              outputs: set[str]) -> list[str]:
    return [*([dataset_prefix(tenant_id, dataset_id)] if dataset_id else []),
            *(training_prefix(tenant_id, job_id) for job_id in sorted(own)),
            *(lora_prefix(tenant_id, lora_id) for lora_id in lora_ids),
            *(job_prefix(tenant_id, job_id) for job_id in sorted(outputs))]


async def forget_jobs(state: Any, job_ids: set[str]) -> None:
    """Delete stopped jobs whole: their objects (any prefix a job of any kind writes under),
    Redis entries and rows."""
    async with state.sessionmaker() as session:
        rows = (await session.execute(select(Job.id, Job.tenant_id, Job.spec)
                                      .where(Job.id.in_(job_ids)))).all()
        prefixes = [prefix for row in rows for prefix in (
            job_prefix(row.tenant_id, row.id), training_prefix(row.tenant_id, row.id),
            *([tagging_prefix(row.tenant_id, str(row.spec["dataset_id"]), row.id)]
              if isinstance(row.spec, dict) and row.spec.get("dataset_id") else []))]
        await count_and_delete(state.store, prefixes)
        await scrub_redis(state.redis, stream=state.settings.redis.events_stream,
                          dead_letter=state.settings.redis.events_dead_letter_stream,
                          job_ids=job_ids)
        async with state.write_lock:
            await _delete_jobs(session, job_ids)
            await session.commit()


async def start_lora_deletion(*, session: AsyncSession, state: Any, tenant: Tenant,
                              lora: Lora, outputs: bool) -> str:
    """An uploaded (or a plain trained) LoRA: the row goes now, the rest in
    :func:`finish_lora_deletion`; returns the deletion's id."""
    async with state.write_lock:
        deletion = LoraDeletion(tenant_id=tenant.id, plan={
            "lora": {"id": lora.id, "sha256": lora.sha256}, "outputs": outputs})
        session.add(deletion)
        await session.delete(lora)
        await session.commit()
    return deletion.id


async def finish_lora_deletion(state: Any, deletion_id: str) -> bool:
    async with state.sessionmaker() as session:
        deletion = await session.get(LoraDeletion, deletion_id)
        if deletion is None:
            return True
        tenant_id, plan = deletion.tenant_id, dict(deletion.plan)
        lora = plan["lora"]
        made = await _lineage_jobs(session, [lora["id"]])
        if plan.get("outputs"):
            if await stop_jobs(state, session, made):
                return False
        else:  # the outputs stay; jobs still rendering with it are stopped
            await stop_jobs(state, session, made)
        await count_and_delete(state.store, _prefixes(
            tenant_id, None, set(), [lora["id"]], made if plan.get("outputs") else set()))
        if plan.get("outputs"):
            await scrub_redis(state.redis, stream=state.settings.redis.events_stream,
                              dead_letter=state.settings.redis.events_dead_letter_stream,
                              job_ids=made)
        async with state.write_lock:
            if plan.get("outputs"):
                await _delete_jobs(session, made)
            await session.execute(delete(JobLora).where(JobLora.lora_id == lora["id"]))
            await session.delete(deletion)
            await session.commit()
    await record_lora_eviction(state.redis, sha256=lora["sha256"])
    return True


async def purge_photos(state: Any, subject_id: str) -> bool:
    """Retention: once a subject that keeps no photos is finished, delete its photos,
    thumbnails, dataset rows, captions, tagging outputs and the training's samples, checkpoints,
    states and logs, with their task payloads and events in Redis; the LoRA and the subject's
    record of what went (``purged``) stay. True when there was something to do."""
    from services.gateway.subjects.service import record_event

    async with state.sessionmaker() as session:
        subject = await session.get(Subject, subject_id)
        if (subject is None or subject.retain_photos or subject.purged is not None
                or subject.status not in ("ready", "failed", "canceled")):
            return False
        own = {job_id for job_id in (subject.tagging_job_id, subject.training_job_id) if job_id}
        if await stop_jobs(state, session, own):
            return False  # a canceled stage still stopping: next pass
        items = len(list(await session.scalars(select(DatasetItem.id).where(
            DatasetItem.dataset_id == (subject.dataset_id or "")))))
        objects = await count_and_delete(state.store, _prefixes(
            subject.tenant_id, subject.dataset_id, own, [], set()))
        await scrub_redis(state.redis, stream=state.settings.redis.events_stream,
                          dead_letter=state.settings.redis.events_dead_letter_stream,
                          job_ids=own)
        async with state.write_lock:
            from services.gateway.subjects.service import locked_subject

            fresh = await locked_subject(session, subject_id)
            if fresh is None or fresh.purged is not None or fresh.status == "deleting":
                await session.rollback()
                return False
            subject = fresh
            await session.execute(delete(Artifact).where(Artifact.job_id.in_(own or {""})))
            await _delete_dataset(session, subject.dataset_id)
            subject.purged = {"at": utcnow().isoformat(), "objects": objects, "photos": items,
                              "what": ["photos", "thumbnails", "dataset rows", "captions",
                                       "tagging outputs", "samples", "checkpoints",
                                       "resumable states", "metrics and logs",
                                       "queued task payloads and events"]}
            await record_event(session, subject, "photos_deleted", data=subject.purged)
            await session.commit()
    return True

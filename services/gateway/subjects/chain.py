"""What moves a subject after a commit: the next stage's job submitted, photos deleted, a
deletion finished. Everything here is idempotent, so it is safe to run twice, from two gateways
or after a crash.

The event consumer wakes the chain with the subjects whose stage changed in the batch it
committed; a sweep of every unfinished subject, unfinished purge and deletion under way runs at
start-up and every ``sweep_interval_s``, which is what finishes a chain or a deletion that a
killed gateway left half-done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterable
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import select

from services.gateway.db.models import LoraDeletion, Subject, Tenant
from services.gateway.subjects.forget import (
    finish_lora_deletion,
    finish_subject_deletion,
    purge_photos,
)
from services.gateway.subjects.schemas import ACTIVE_STATUSES, FINISHED_STATUSES
from services.gateway.subjects.service import locked_subject, move
from services.gateway.trainings.schemas import TrainingRequest
from shared.errors import LoomisError, ServiceUnavailable
from shared.specs import TaggingSpec
from shared.training import TrainingSpec

logger = logging.getLogger(__name__)

_TRAINING: TypeAdapter[TrainingSpec] = TypeAdapter(TrainingRequest)


def lora_name(subject: Subject) -> str:
    """The LoRA is named by the trigger, not by the person's name (it is written into PNG text
    and manifests)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{subject.token}-{subject.class_word}")[:64]


class SubjectChain:
    def __init__(self, state: Any, *, sweep_interval_s: float = 5.0) -> None:
        self.state = state
        self.sweep_interval_s = sweep_interval_s
        self._due: set[str] = set()
        self._wake = asyncio.Event()

    def wake(self, subject_ids: Iterable[str]) -> None:
        self._due.update(subject_ids)
        self._wake.set()
        self.state.subject_news.notify()  # their event streams read the change now

    async def run(self, stop: asyncio.Event) -> None:
        next_sweep = 0.0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                if loop.time() >= next_sweep:
                    await self.sweep()
                    next_sweep = loop.time() + self.sweep_interval_s
                due, self._due = self._due, set()
                for subject_id in due:
                    await self.advance(subject_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a database or Redis outage: the next sweep retries
                logger.warning("subject chain pass failed; retrying", exc_info=True)
            self._wake.clear()
            if not self._due:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(),
                                           max(0.05, next_sweep - loop.time()))

    async def sweep(self) -> None:
        async with self.state.sessionmaker() as session:
            open_ids = list(await session.scalars(select(Subject.id).where(
                Subject.status.in_([*ACTIVE_STATUSES, "deleting"]))))
            unpurged = list(await session.scalars(select(Subject.id).where(
                Subject.status.in_(FINISHED_STATUSES), Subject.retain_photos.is_(False),
                Subject.purged.is_(None))))
            deletions = list(await session.scalars(select(LoraDeletion.id)))
        for subject_id in [*open_ids, *unpurged]:
            await self.advance(subject_id)
        for deletion_id in deletions:
            await finish_lora_deletion(self.state, deletion_id)

    async def advance(self, subject_id: str) -> None:
        """Do whatever the subject's state asks next; nothing when nothing is due."""
        try:
            await self._advance(subject_id)
        finally:
            self.state.subject_news.notify()

    async def _advance(self, subject_id: str) -> None:
        async with self.state.sessionmaker() as session:
            subject = await session.get(Subject, subject_id)
            if subject is None:
                return
            status = subject.status
        if status == "deleting":
            await finish_subject_deletion(self.state, subject_id)
        elif status in FINISHED_STATUSES:
            await purge_photos(self.state, subject_id)
        elif status == "preparing":
            async with self.state.write_lock, self.state.sessionmaker() as session:
                subject = await locked_subject(session, subject_id)
                if subject is None or subject.status != "preparing":
                    return
                await move(session, subject, "captioning" if subject.caption else "training")
                await session.commit()
            await self._advance(subject_id)
        elif status == "captioning":
            await self._start(subject_id, "captioning")
        elif status == "training":
            await self._start(subject_id, "training")

    async def _start(self, subject_id: str, stage: str) -> None:
        """Submit the stage's job once: its Idempotency-Key makes a second try (another gateway,
        a retry after a crash) find the same job."""
        from services.gateway.taggings.service import submit_tagging
        from services.gateway.trainings.service import submit_training

        column = "tagging_job_id" if stage == "captioning" else "training_job_id"
        async with self.state.sessionmaker() as session:
            subject = await session.get(Subject, subject_id)
            if subject is None or subject.status != stage or getattr(subject, column):
                return
            tenant = await session.get(Tenant, subject.tenant_id)
            assert tenant is not None
            key = f"subject:{subject.id}:{stage}"
            try:
                if stage == "captioning":
                    job, _ = await submit_tagging(
                        session=session, state=self.state, tenant=tenant,
                        spec=TaggingSpec(dataset_id=subject.dataset_id or ""),
                        idempotency_key=key)
                else:
                    spec = _TRAINING.validate_python({
                        **subject.training, "name": lora_name(subject),
                        "dataset_id": subject.dataset_id})
                    job, _ = await submit_training(session=session, state=self.state,
                                                   tenant=tenant, spec=spec, idempotency_key=key)
            except ServiceUnavailable:
                logger.warning("subject %s: the queue is unavailable; retried", subject_id)
                return
            except LoomisError as exc:
                await session.rollback()
                async with self.state.write_lock:
                    subject = await locked_subject(session, subject_id)
                    if subject is not None and subject.status == stage:
                        await move(session, subject, "failed", data={"stage": stage}, error={
                            "code": f"{stage}_not_started",
                            "message": f"the {stage} job could not start: {exc.detail}"})
                        await session.commit()
                return
            job_id = job.id
        async with self.state.write_lock, self.state.sessionmaker() as session:
            subject = await locked_subject(session, subject_id)
            if subject is not None and getattr(subject, column) is None:
                # recorded whatever happened meanwhile: a deletion or a purge under way then
                # finds the job (waits for it to stop, deletes it) through the subject
                setattr(subject, column, job_id)
                status = subject.status
                await session.commit()
                if status == stage:
                    return
            elif subject is not None:
                return  # the job's own end recorded it (and moved the subject on)
        # canceled, being deleted or gone while the job was being made: it is not wanted
        await self._drop(job_id, gone=subject is None)

    async def _drop(self, job_id: str, *, gone: bool) -> None:
        """Stop an unwanted stage job; when its subject is already gone, nothing else will
        delete it, so wait for it to stop and delete it (rows, objects, Redis) here."""
        from services.gateway.subjects.forget import forget_jobs, stop_jobs

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        async with self.state.sessionmaker() as session:
            while await stop_jobs(self.state, session, {job_id}):
                if not gone or loop.time() > deadline:
                    return
                await asyncio.sleep(0.25)
        if gone:
            await forget_jobs(self.state, {job_id})

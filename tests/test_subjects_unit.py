"""Subjects without a stack: the recipes, the options a subject refuses, and the stage moves
that ride on a job's terminal event (on a real SQLite database, migrated)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from services.gateway.db.models import Job, Lora, Subject, SubjectEvent, Tenant
from services.gateway.db.session import make_engine, make_sessionmaker, migrate
from services.gateway.jobs.service import apply_event
from services.gateway.subjects.chain import lora_name
from services.gateway.subjects.presets import REPEATS, training_options
from services.gateway.subjects.service import rare_token, with_triggers
from shared.errors import ValidationFailed
from shared.events import JobEvent
from shared.outcomes import LoraRegistration, TrainingSucceeded
from shared.specs import JobStatus


def test_the_standard_recipe_is_the_old_applications() -> None:
    options = training_options("standard", {})
    assert REPEATS["standard"] == 300  # 5 photos x 300 repeats x 1 epoch = 1,500 steps
    assert options["base_model"] == "sd15" and options["optim"]["max_train_epochs"] == 1
    assert options["data"]["batch_size"] == 1 and options["data"]["resolution"] in (512, [512, 512])
    quick = training_options("quick", {"optim": {"max_train_steps": 7}, "network": {"rank": 2}})
    assert quick["optim"]["max_train_steps"] == 7 and quick["network"]["rank"] == 2
    assert quick["optim"]["learning_rate"] == 0.005  # the rest of the preset stays


@pytest.mark.parametrize(("overrides", "field"), [
    ({"foo": 1}, "overrides.foo"),
    ({"optim": {"learning_rate": -1}}, "overrides.optim.learning_rate"),
    ({"name": "x"}, "overrides.name"),
    ({"resume_from": "job"}, "overrides.resume_from"),
    ({"diffusion": {"cache_latents_to_disk": True}},
     "overrides.diffusion.cache_latents_to_disk"),
])
def test_an_override_a_subject_cannot_take_names_its_field(overrides: dict[str, object],
                                                           field: str) -> None:
    with pytest.raises(ValidationFailed) as raised:
        training_options("quick", overrides)
    assert field in {error["field"] for error in raised.value.errors}


def test_tokens_and_triggers() -> None:
    tokens = {rare_token() for _ in range(50)}
    assert len(tokens) > 45 and all(t.isalpha() and t.islower() and len(t) == 6 for t in tokens)
    assert with_triggers("a portrait", ["zovek woman"]) == "zovek woman, a portrait"
    assert with_triggers("Zovek Woman at sea", ["zovek woman"]) == "Zovek Woman at sea"


async def _chain_db(tmp: Path, *, status: str, cancel: bool) -> tuple[object, str, str]:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp / 'unit.db'}")
    await migrate(engine)
    sessions = make_sessionmaker(engine)
    async with sessions() as session:
        tenant = Tenant(name="t")
        session.add(tenant)
        await session.flush()
        subject = Subject(tenant_id=tenant.id, name="n", class_word="woman", token="zovek",
                          preset="quick", training={}, overrides={}, consent="yes",
                          status=status, cancel_requested=cancel, photos=3, duplicates=[],
                          trigger_words=[], deletion={"loras": []} if status == "deleting"
                          else None)
        session.add(subject)
        await session.flush()
        job = Job(tenant_id=tenant.id, kind="training", status="running", spec={},
                  idempotency_key=f"subject:{subject.id}:training", last_seq=1)
        session.add(job)
        await session.commit()
        return sessions, subject.id, job.id


def _succeeded(job_id: str) -> JobEvent:
    outcome = TrainingSucceeded(register_lora=LoraRegistration(
        id="lora-1", name="zovek-woman", family="sd15", base_model="tiny-sd15",
        key="loras/t/lora-1/1.safetensors", sha256="ab" * 32, size=10, rank=4))
    return JobEvent(job_id=job_id, seq=2, type="succeeded", at=datetime.now(UTC),
                    status=JobStatus.SUCCEEDED, data=outcome.event_data())


@pytest.mark.parametrize("cancel", [False, True])
def test_a_finished_training_makes_the_subject_ready_even_after_a_late_cancel(
        tmp_path: Path, cancel: bool) -> None:
    """A cancel that arrives after the last step is too late: the LoRA is the subject's, so
    deleting the subject deletes it; it is never left as an orphan trained on the photos."""
    async def run() -> None:
        sessions, subject_id, job_id = await _chain_db(tmp_path, status="training", cancel=cancel)
        async with sessions() as session:  # type: ignore[operator]
            assert await apply_event(session=session, event=_succeeded(job_id))
            await session.commit()
            subject = await session.get(Subject, subject_id)
            lora = await session.get(Lora, "lora-1")
            assert subject.status == "ready" and subject.lora_id == "lora-1"
            assert subject.training_job_id == job_id  # named by its Idempotency-Key
            assert lora is not None and lora.subject_id == subject_id
            events = list(await session.scalars(select(SubjectEvent.type)))
            assert events == ["ready"]

    asyncio.run(run())


def test_a_training_that_ends_during_a_deletion_is_added_to_it(tmp_path: Path) -> None:
    async def run() -> None:
        sessions, subject_id, job_id = await _chain_db(tmp_path, status="deleting", cancel=True)
        async with sessions() as session:  # type: ignore[operator]
            await apply_event(session=session, event=_succeeded(job_id))
            await session.commit()
            subject = await session.get(Subject, subject_id)
            assert subject.status == "deleting"
            assert subject.deletion["loras"] == [{"id": "lora-1", "sha256": "ab" * 32}]
            assert (await session.get(Lora, "lora-1")).subject_id == subject_id

    asyncio.run(run())


def test_the_lora_is_named_by_its_trigger_not_the_person() -> None:
    subject = Subject(name="Maria Rossi", token="zovek", class_word="young woman")
    assert lora_name(subject) == "zovek-young-woman"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_page_of_subjects_costs_the_same_few_queries_as_one(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """Lineage for a page is read in one go (it was five queries per subject): each subject
    gets its own LoRAs, jobs, newest outputs up to the limit and the true total."""
    from datetime import timedelta

    from sqlalchemy import event

    from services.gateway.db.models import JobLora
    from services.gateway.subjects.service import subjects_out

    url = (f"sqlite+aiosqlite:///{tmp_path / 'page.sqlite'}" if backend == "sqlite"
           else request.getfixturevalue("pg_database"))

    async def run() -> None:
        engine = make_engine(url)
        await migrate(engine)
        sessions = make_sessionmaker(engine)
        start = datetime.now(UTC)
        async with sessions() as session:
            tenant = Tenant(name="t")
            session.add(tenant)
            await session.flush()
            subjects = []
            for index, (status, outputs) in enumerate([("ready", 5), ("training", 0),
                                                       ("captioning", 2)]):
                subject = Subject(tenant_id=tenant.id, name=f"s{index}", class_word="man",
                                  token=f"tok{index}", preset="quick", training={},
                                  overrides={}, consent="yes", status=status, photos=3,
                                  duplicates=[], trigger_words=[])
                session.add(subject)
                await session.flush()
                stage_job = Job(tenant_id=tenant.id, kind="training", status="running",
                                spec={}, progress=0.25 * (index + 1))
                session.add(stage_job)
                await session.flush()
                subject.training_job_id = stage_job.id
                if status == "captioning":
                    subject.tagging_job_id = stage_job.id
                lora = Lora(tenant_id=tenant.id, name=f"l{index}", family="sd15",
                            base_model="tiny-sd15", key="k", sha256=f"{index}" * 64, size=1,
                            format="kohya", rank=4, subject_id=subject.id)
                session.add(lora)
                await session.flush()
                for n in range(outputs):
                    made = Job(tenant_id=tenant.id, kind="scene", status="succeeded",
                               spec={}, created_at=start + timedelta(seconds=n))
                    session.add(made)
                    await session.flush()
                    session.add(JobLora(job_id=made.id, lora_id=lora.id, tenant_id=tenant.id,
                                        subject_id=subject.id, sha256=lora.sha256))
                subjects.append(subject)
            await session.commit()
            ids = [s.id for s in subjects]
        statements: list[str] = []
        event.listen(engine.sync_engine, "before_cursor_execute",
                     lambda *args: statements.append(args[2]))
        async with sessions() as session:
            rows = [await session.get(Subject, subject_id) for subject_id in ids]
            statements.clear()
            out = await subjects_out(session, [r for r in rows if r], outputs_limit=3)
        assert len(statements) == 4  # loras, stage jobs, ranked outputs, totals
        assert [o.lineage["outputs_total"] for o in out] == [5, 0, 2]
        newest = [o["created_at"] for o in out[0].lineage["outputs"]]
        assert len(newest) == 3 and newest == sorted(newest, reverse=True)
        assert [[lora["name"] for lora in o.lineage["loras"]] for o in out] == [
            ["l0"], ["l1"], ["l2"]]
        assert [o.progress for o in out] == [1.0, 0.5, 0.75]  # ready, then each stage's job
        assert out[2].stage is not None and out[2].stage.name == "captioning"
        await engine.dispose()

    asyncio.run(run())

"""What a training would run, before it runs, and what it did, step by step, while it runs."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.db.models import DatasetItem, Job, JobEventRow, Tenant
from services.gateway.deps import GatewayState
from services.gateway.trainings.schemas import (
    PlanBucket,
    PlanSubset,
    PlanWarning,
    StepMetrics,
    TrainingMetrics,
    TrainingPlan,
)
from services.gateway.trainings.service import (
    _examples,
    _invalid,
    check_trainable,
    resolve_dataset_config,
)
from services.gateway.trainings.triggers import trained_triggers
from shared.errors import NotFound
from shared.keys import training_metrics_key, training_prefix
from shared.specs import JobKind, JobStatus
from shared.training import TrainingSpec

# what the trainer worker trains for when the spec names neither steps nor epochs
DEFAULT_MAX_TRAIN_STEPS = 1600


async def plan_training(*, session: AsyncSession, state: GatewayState, tenant: Tenant,
                        spec: TrainingSpec) -> TrainingPlan:
    """The run a submission would start, counted as the trainer counts it, from what SQL
    holds about the dataset (captions, sizes, buckets): no image is read."""
    check_trainable(state=state, spec=spec)  # as a submission would, before the dataset
    spec = await resolve_dataset_config(session=session, tenant=tenant, spec=spec)
    try:
        examples, candidates, notes = await _examples(session=session, tenant=tenant, spec=spec)
    except NotFound as exc:
        raise _invalid("dataset_id", exc.detail) from exc
    data, optim = spec.data, spec.optim
    dataset_ids = [spec.dataset_id, *([spec.reg_dataset_id] if spec.reg_dataset_id else [])]
    sizes = {row.key: (row.width, row.height) for row in (await session.execute(
        select(DatasetItem.key, DatasetItem.width, DatasetItem.height)
        .where(DatasetItem.dataset_id.in_(dataset_ids)))).all()}
    subsets: dict[tuple[str, bool], PlanSubset] = {}
    # a kohya [[datasets]] batches on its own, at its own size (the trainer never mixes them)
    bucket_images: Counter[tuple[int, int, int]] = Counter()
    bucket_items: Counter[tuple[int, int, int]] = Counter()
    batch_sizes: dict[int, int] = {}
    tiny: Counter[str] = Counter()
    for example in examples:
        dataset = example.dataset
        bucket = example.bucket or example.resolution or data.size
        batch_sizes[dataset] = example.batch_size or data.batch_size
        repeats = max(1, example.repeats)
        bucket_images[(dataset, bucket[0], bucket[1])] += 1
        bucket_items[(dataset, bucket[0], bucket[1])] += repeats
        entry = subsets.setdefault((example.subset, example.is_reg), PlanSubset(
            folder=example.subset, is_reg=example.is_reg, images=0, num_repeats=0, items=0))
        entry.images += 1
        entry.items += repeats
        entry.num_repeats = max(entry.num_repeats, repeats)
        width, height = sizes.get(example.key, (0, 0))
        if width < bucket[0] or height < bucket[1]:
            tiny[example.subset] += 1
    batch_size = data.batch_size
    buckets = [PlanBucket(dataset=d, width=w, height=h, images=bucket_images[(d, w, h)],
                          items=items, batch_size=batch_sizes[d],
                          batches=-(-items // batch_sizes[d]))
               for (d, w, h), items in sorted(bucket_items.items())]
    batches = sum(b.batches for b in buckets)
    per_epoch = -(-batches // optim.gradient_accumulation_steps)
    if optim.max_train_epochs is not None:
        epochs, total = optim.max_train_epochs, optim.max_train_epochs * per_epoch
    else:
        total = optim.max_train_steps or DEFAULT_MAX_TRAIN_STEPS
        epochs = -(-total // per_epoch)
    warnings = [PlanWarning(code="tiny_images", subset=folder, message=(
        f"{count} image(s) of {folder!r} are smaller than their bucket and will be upscaled"))
        for folder, count in tiny.items()]
    warnings += [PlanWarning(code="unbalanced_buckets", message=(
        f"bucket {b.width}x{b.height} has {b.items} item(s), fewer than batch_size "
        f"{b.batch_size}: its batch is partial")) for b in buckets if b.items < b.batch_size]
    warnings += [PlanWarning(code="captions_unread", subset=folder, message=note)
                 for folder, note in notes]
    # the words the job would report, and the captions that lack them, as the job says it
    triggers, gaps = trained_triggers(examples, candidates)
    warnings += [PlanWarning(code="trigger_missing", subset=gap.subset, message=gap.message)
                 for gap in gaps]
    for (folder, is_reg), entry in subsets.items():
        if not is_reg and candidates:
            entry.class_tokens = next((t for t in candidates if t in folder), None)
    return TrainingPlan(
        subsets=list(subsets.values()), buckets=buckets, batch_size=batch_size,
        gradient_accumulation_steps=optim.gradient_accumulation_steps,
        batches_per_epoch=batches, steps_per_epoch=per_epoch, epochs=epochs, total_steps=total,
        trigger_words=triggers, warnings=warnings)


async def training_metrics(*, session: AsyncSession, state: GatewayState, tenant: Tenant,
                           job_id: str) -> TrainingMetrics:
    """Every step from the job's progress events in SQL; steps whose events the stream lost
    (trimmed while no gateway consumed it) come from the metrics document the trainer stores
    at each checkpoint and at the end."""
    job = await session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant.id,
                                                  Job.kind == JobKind.TRAINING.value))
    if job is None:
        raise NotFound(f"training job {job_id} not found", code="job_not_found")
    by_step: dict[int, dict[str, Any]] = {}
    with contextlib.suppress(NotFound):
        stored = await state.store.get(training_metrics_key(training_prefix(tenant.id, job_id)))
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            for point in json.loads(stored).get("steps", []):
                if isinstance(point, dict) and isinstance(point.get("step"), int):
                    by_step[point["step"]] = point
    total: int | None = None
    rows = await session.scalars(select(JobEventRow.data).where(
        JobEventRow.job_id == job_id, JobEventRow.type == "progress").order_by(JobEventRow.seq))
    for data in rows:
        if not isinstance(data.get("step"), int) or "loss" not in data:
            continue
        total = data.get("total_steps", total)
        by_step[data["step"]] = {
            "step": data["step"], "epoch": data.get("epoch"), "loss": data.get("step_loss"),
            "avr_loss": data.get("loss"), "lr": data.get("lr"),
            "step_time_s": data.get("step_time_s")}
    return TrainingMetrics(
        job_id=job.id, status=JobStatus(job.status), total_steps=total,
        steps=[StepMetrics.model_validate(by_step[step]) for step in sorted(by_step)])

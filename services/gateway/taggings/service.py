"""Tagging jobs: the gateway hands the worker the dataset's items; results come back on the
job's terminal event and are written onto the items (see ``jobs.service.apply_event``)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.datasets.service import (
    dataset_items,
    get_dataset,
    item_tags,
    subsets_of,
)
from services.gateway.db.models import Job, Tenant
from services.gateway.deps import GatewayState
from services.gateway.jobs.submission import create_and_enqueue, find_replay, request_hash
from services.gateway.webhooks.service import check_job_webhook
from shared.errors import ValidationFailed
from shared.keys import tagging_prefix
from shared.queue import TAG_TASK, TAGGER_QUEUE
from shared.specs import JobKind, TaggingItem, TaggingSpec, TaggingTask


async def submit_tagging(
    *, session: AsyncSession, state: GatewayState, tenant: Tenant, spec: TaggingSpec,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    digest = request_hash(spec)
    if idempotency_key and (existing := await find_replay(
            session=session, tenant=tenant, key=idempotency_key, digest=digest)):
        return existing, False
    webhook = await check_job_webhook(settings=state.settings, webhook=spec.webhook)
    dataset = await get_dataset(session=session, tenant=tenant, dataset_id=spec.dataset_id)
    items = await dataset_items(session=session, dataset=dataset)
    if not items:
        raise ValidationFailed([{"field": "dataset_id", "message": "the dataset has no images"}])
    subsets = subsets_of(dataset)
    # A training subset's trigger (`10_sks dog`); regularisation images are the class alone.
    triggers = {name: info.class_tokens for name, info in subsets.items() if not info.is_reg}
    queued_items = [TaggingItem(id=i.id, key=i.key, path=i.path, caption=i.caption,
                                tags=item_tags(i), trigger=triggers.get(i.subset)) for i in items]
    return await create_and_enqueue(
        session=session, state=state, tenant=tenant, kind=JobKind.TAGGING,
        spec={**spec.model_dump(mode="json"), "images": len(items)}, digest=digest,
        idempotency_key=idempotency_key, task_name=TAG_TASK, queue=TAGGER_QUEUE,
        webhook=webhook,
        payload=lambda job_id: TaggingTask(
            job_id=job_id, tenant_id=tenant.id, spec=spec, items=queued_items,
            caption_extension=dataset.caption_extension,
            output_prefix=tagging_prefix(tenant.id, dataset.id, job_id)).model_dump(mode="json"),
    )

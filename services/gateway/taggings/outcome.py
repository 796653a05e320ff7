"""What a succeeded tagging job leaves in SQL: captions, tags and errors on its dataset's items."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.db.models import DatasetItem, Job, utcnow
from shared.outcomes import Succeeded, TaggingSucceeded


async def write_item_results(session: AsyncSession, job: Job, outcome: Succeeded) -> None:
    """Each image keeps its own result: one that failed gets an ``error`` flag, the others their
    captions and tags (a caption the tagger wrote no longer comes from an uploaded file)."""
    assert isinstance(outcome, TaggingSucceeded)
    dataset_id = (job.spec or {}).get("dataset_id")
    if not dataset_id or not outcome.dataset_items:
        return
    results = outcome.dataset_items
    rows = await session.scalars(select(DatasetItem).where(
        DatasetItem.dataset_id == dataset_id, DatasetItem.tenant_id == job.tenant_id,
        DatasetItem.id.in_(list(results))))
    for row in rows:
        result = results[row.id]
        sent = result.model_fields_set
        flags = dict(row.flags)
        if "error" in sent:
            flags["error"] = str(result.error)
        else:
            flags.pop("error", None)
        if "caption" in sent:
            row.caption = result.caption
            flags.pop("caption_file", None)
        if "tags" in sent:
            row.tags = {"tags": list(result.tags or [])}
        row.flags = flags
        row.updated_at = utcnow()

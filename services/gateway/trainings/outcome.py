"""What a succeeded training leaves in SQL: its LoRA, registered as the tenant's."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.db.models import Job, Lora, utcnow
from shared.outcomes import Succeeded, TrainingSucceeded


async def register_trained_lora(session: AsyncSession, job: Job, outcome: Succeeded) -> None:
    """Usable in generations at once; a redelivered outcome registers nothing twice."""
    assert isinstance(outcome, TrainingSucceeded)
    lora = outcome.register_lora
    if lora is None or await session.get(Lora, lora.id) is not None:
        return
    session.add(Lora(
        id=lora.id, tenant_id=job.tenant_id, name=lora.name[:100], family=lora.family,
        base_model=lora.base_model, key=lora.key, sha256=lora.sha256, size=lora.size,
        format="kohya", rank=lora.rank, info=dict(lora.info), source="training",
        created_at=utcnow(),
    ))

"""What a succeeded scene leaves in SQL: the action embeddings it computed."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.db.models import Action, Job
from shared.outcomes import SceneSucceeded, Succeeded


async def cache_action_embeddings(session: AsyncSession, job: Job, outcome: Succeeded) -> None:
    """Keep the embeddings the job computed, so the next scene from text embeds only its text.
    One of an action renamed meanwhile carries the old text's hash, and the generator embeds
    that action again instead of using it."""
    assert isinstance(outcome, SceneSucceeded)
    for action_id, cached in outcome.action_embeddings.items():
        await session.execute(
            update(Action).where(Action.id == action_id, Action.tenant_id == job.tenant_id)
            .values(embedding=cached.get("vector"), embedding_hash=cached.get("hash")))

"""`POST /v1/actions/match`: how a text ranks against the tenant's actions, before a scene.

The embedding model lives with the generator (the gateway imports no ML stack), so the ranking
is asked of a generator worker and waited for, as control previews are. Embeddings the worker
computed are kept on the actions, so later matches and scenes embed only their text.
"""

from __future__ import annotations

import uuid
from typing import Any

from arq.jobs import Job as ArqJob
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select, update
from sqlalchemy.orm import selectinload

from services.gateway.db.models import Action
from services.gateway.deps import SessionDep, StateDep, TenantDep
from services.gateway.problems import PROBLEM_RESPONSES
from services.gateway.scenes.submission import scene_action
from shared.errors import ServiceUnavailable, ValidationFailed
from shared.outcomes import ActionScore
from shared.queue import GENERATOR_QUEUE, MATCH_ACTIONS_TASK
from shared.specs.scene import ShotName
from shared.text import RequestModel

router = APIRouter(prefix="/v1/actions", tags=["actions"], responses=PROBLEM_RESPONSES)


class MatchIn(RequestModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"text": "greeting a friend with a raised hand", "shot": "far"}]})

    text: str = Field(min_length=1, max_length=500, description="What the person does, in words.")
    shot: ShotName | None = Field(default=None, description="Only actions that have this shot "
                                  "(what a scene with it would choose from).")

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty or only whitespace")
        return value


class MatchOut(BaseModel):
    text: str = Field(description="The text, as sent.")
    scores: list[ActionScore] = Field(description="Every candidate action, best first: the "
                                      "first is what a scene with this `action_text` uses.")


@router.post("/match", response_model=MatchOut, summary="Rank actions against a text",
             responses={504: {"description": "No generator worker answered in time"}})
async def match_actions(body: MatchIn, session: SessionDep, tenant: TenantDep,
                        state: StateDep) -> MatchOut:
    """Preview which action a scene's `action_text` would pick: every action (with the shot,
    when given) scored by the cosine similarity of its name and description to the text."""
    rows = list(await session.scalars(
        select(Action).where(Action.tenant_id == tenant.id).options(selectinload(Action.shots))
        .order_by(Action.name)))
    candidates = [scene_action(action, shot) for action in rows for shot in action.shots
                  if body.shot is None or shot.shot == body.shot.value]
    unique = list({c.id: c for c in candidates}.values())
    if not unique:
        raise ValidationFailed([{"field": "shot" if body.shot else "text", "message":
                                 "no action of yours" + (f" has a {body.shot.value} shot"
                                                         if body.shot else " to match")}])
    await session.close()  # the worker may be busy: hold no pooled connection meanwhile
    payload = {"text": body.text, "actions": [c.model_dump(mode="json") for c in unique]}
    try:
        job = await state.redis.enqueue_job(MATCH_ACTIONS_TASK, payload,
                                            _job_id=f"match-{uuid.uuid4()}",
                                            _queue_name=GENERATOR_QUEUE)
    except Exception as exc:
        raise ServiceUnavailable("the job queue is unavailable; try again",
                                 code="queue_unavailable") from exc
    assert isinstance(job, ArqJob)
    try:
        result: dict[str, Any] = await job.result(
            timeout=state.settings.generator.preprocess_timeout_s, poll_delay=0.05)
    except TimeoutError as exc:
        error = ServiceUnavailable("no generator worker answered in time; try again",
                                   code="match_timeout")
        error.status = 504
        raise error from exc
    if result.get("embeddings"):
        async with state.write_lock, state.sessionmaker() as db:
            for action_id, cached in result["embeddings"].items():
                await db.execute(update(Action).where(
                    Action.id == action_id, Action.tenant_id == tenant.id).values(
                    embedding=cached.get("vector"), embedding_hash=cached.get("hash")))
            await db.commit()
    return MatchOut(text=body.text, scores=[ActionScore.model_validate(s)
                                            for s in result["scores"]])

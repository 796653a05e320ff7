"""HTTP for the model presets."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from services.gateway.deps import StateDep, TenantDep
from services.gateway.models import service
from services.gateway.models.schemas import ModelPage
from services.gateway.problems import PROBLEM_RESPONSES

router = APIRouter(prefix="/v1/models", tags=["models"], responses=PROBLEM_RESPONSES)


@router.get("", response_model=ModelPage, summary="List the model presets")
async def list_models(state: StateDep, _tenant: TenantDep) -> ModelPage:
    """Every preset a generation's `model` may name: its family, sizes, steps, guidance,
    schedulers, ControlNet types, inpainting support, where its weights come from and
    whether they are there (as the gateway sees the model cache and paths)."""
    settings = state.settings
    # Presence checks touch the filesystem (a network volume can be slow): off the loop.
    return await asyncio.to_thread(
        service.list_models, registry=state.registry, model_cache=settings.model_cache,
        default_model=settings.generator.default_model)

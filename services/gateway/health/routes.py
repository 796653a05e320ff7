"""Liveness and readiness for load balancers and Kubernetes probes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from services.gateway.deps import GatewayState, StateDep

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 2.0


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _check(probe: Callable[[], Awaitable[Any]]) -> str:
    try:
        await asyncio.wait_for(probe(), CHECK_TIMEOUT_S)
    except Exception as exc:  # any failure means "not ready"; the message says which
        return f"error: {type(exc).__name__}: {exc}"[:300]
    return "ok"


async def _dead_letter_events(state: GatewayState) -> int | None:
    """Events parked because they could not be recorded; each failed its job. Not part of
    readiness (the gateway works), but a number to watch and alert on."""
    stream = state.settings.redis.events_dead_letter_stream
    try:
        return int(await asyncio.wait_for(state.redis.xlen(stream), CHECK_TIMEOUT_S))
    except Exception:  # Redis down: the redis check already says so
        return None


@router.get("/readyz", summary="Readiness: Redis, storage and the database all answer")
async def readyz(state: StateDep) -> JSONResponse:
    async def db() -> None:
        async with state.sessionmaker() as session:
            await session.execute(text("SELECT 1"))

    names = ("redis", "storage", "database")
    *results, dead_letters = await asyncio.gather(
        _check(state.redis.ping), _check(state.store.check), _check(db),
        _dead_letter_events(state),
    )
    checks = dict(zip(names, results, strict=True))
    ready = all(result == "ok" for result in results)
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks,
         "dead_letter_events": dead_letters},
        status_code=200 if ready else 503,
    )

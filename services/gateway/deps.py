"""FastAPI dependencies as Annotated aliases, so routes read as plain signatures."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.gateway.auth.service import ApiKeyLookups, authenticate
from services.gateway.db.models import Tenant
from services.gateway.db.reads import Reads
from services.gateway.db.session import WriteLock
from services.gateway.files.stores import GatewayStore
from services.gateway.jobs.inserts import JobInserts
from shared.errors import ValidationFailed
from shared.events import JobEvents
from shared.models import ModelRegistry
from shared.settings import Settings
from shared.text import control_character, printable


class News:
    """A wake-up for whoever waits on a change in this process (a subject's event stream):
    ``notify`` wakes every current waiter; a waiter also wakes after its timeout, which is what
    catches changes another gateway made."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout_s)


@dataclass
class GatewayState:
    """Clients built once at start-up and shared by every request."""

    settings: Settings
    registry: ModelRegistry
    sessionmaker: async_sessionmaker[AsyncSession]
    reads: Reads  # the hot reads, one trip each (see services/gateway/db/reads.py)
    write_lock: WriteLock  # the hot writes, one at a time on SQLite
    job_inserts: JobInserts  # submissions' rows, committed together
    redis: Any  # arq.ArqRedis: a redis.asyncio.Redis that can also enqueue jobs
    events: JobEvents
    store: GatewayStore
    api_keys: ApiKeyLookups
    # wakes this gateway's webhook dispatcher: deliveries just queued go out at once
    wake_webhooks: Callable[[], None] = lambda: None
    # moves these subjects' chains on (next stage, photo deletion) at once
    wake_subjects: Callable[[Iterable[str]], None] = lambda subject_ids: None
    subject_news: News = field(default_factory=News)  # a subject of this gateway changed


async def refuse_control_characters_in_url(request: Request) -> None:
    """Ids and cursors from the URL reach SQL as text like any field; a ``%00`` in one would
    be a 500 on PostgreSQL, so path and query values get the same check as bodies.

    ``async`` although it never awaits, as ``get_state`` below: FastAPI runs a plain ``def``
    dependency in its thread pool, a thread hop per request for a few microseconds of work."""
    errors: list[dict[str, str]] = []
    params = [("path", k, v) for k, v in request.path_params.items()]
    params += [("query", k, v) for k, v in request.query_params.multi_items()]
    for where, name, value in params:
        for text in (name, str(value)):
            found = control_character(text)
            if found is not None:
                errors.append({"field": f"{where}.{printable(name)}", "type": "control_character",
                               "message": f"contains a control character ({found})"})
                break
    if errors:
        raise ValidationFailed(errors)


async def get_state(request: Request) -> GatewayState:
    return request.app.state.loomis  # type: ignore[no-any-return]


StateDep = Annotated[GatewayState, Depends(get_state)]


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    async with state.sessionmaker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


# Declared so OpenAPI carries the scheme (Swagger UI's "Authorize" button, `security` on each
# operation); auto_error is off because `authenticate` answers with our own problem codes.
bearer_auth = HTTPBearer(
    scheme_name="bearerAuth", bearerFormat="lmk_…", auto_error=False,
    description="An API key: `loomis keys create --tenant NAME` (or the development key that "
                "`loomis up` writes to `.loomis/dev-api-key`).",
)


async def get_tenant(
    state: StateDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_auth)],
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Tenant:
    return await authenticate(lookups=state.api_keys, authorization=authorization)


TenantDep = Annotated[Tenant, Depends(get_tenant)]

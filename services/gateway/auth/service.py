"""API keys: random bearer tokens mapped to tenants; only their SHA-256 is stored."""

from __future__ import annotations

import asyncio
import hashlib
import secrets

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import make_transient_to_detached

from services.gateway.db.models import ApiKey, Tenant, utcnow
from services.gateway.db.reads import Reads
from shared.errors import Unauthorized

KEY_PREFIX = "lmk_"


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


async def get_or_create_tenant(*, session: AsyncSession, name: str) -> Tenant:
    tenant = await session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        await session.flush()
    return tenant


async def create_api_key(*, session: AsyncSession, tenant_name: str, name: str = "") -> str:
    """Create a key for the tenant (created if new); the raw key is returned once, never stored."""
    tenant = await get_or_create_tenant(session=session, name=tenant_name)
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(raw), prefix=raw[:12], name=name))
    await session.commit()
    return raw


async def key_is_valid(*, session: AsyncSession, raw: str) -> bool:
    key = await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(raw)))
    return key is not None and key.revoked_at is None


class ApiKeyLookups:
    """Key checks shared by concurrent requests; nothing is cached.

    A revoked key must fail on the very next request, whichever process revoked it (``loomis
    keys revoke`` only writes the database), so no answer outlives its query. Instead, the
    requests that arrive while a lookup is in flight wait for the next one, which answers all
    of them in one statement: every request is still checked by a read that began after it
    arrived, yet under load one round trip authenticates dozens of requests.
    """

    def __init__(self, reads: Reads) -> None:
        self.reads = reads
        self._waiting: dict[str, list[asyncio.Future[Tenant | None]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def tenant(self, key_hash: str) -> Tenant | None:
        """The active key's tenant, or None for an unknown or revoked key."""
        future: asyncio.Future[Tenant | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key_hash, []).append(future)
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="api-key-lookups")
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, {}
                try:
                    found = await self._lookup(list(batch))
                except BaseException as exc:
                    for futures in batch.values():
                        for future in futures:
                            if future.done():
                                continue
                            if isinstance(exc, asyncio.CancelledError):
                                future.cancel()
                            else:
                                future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for key_hash, futures in batch.items():
                    row = found.get(key_hash)
                    for future in futures:
                        if not future.done():
                            future.set_result(None if row is None else _detached_tenant(row))
        finally:
            self._task = None

    async def _lookup(self, hashes: list[str]) -> dict[str, dict[str, object]]:
        rows = await self.reads.run(
            lambda conn: conn.execute(_ACTIVE_KEYS, {"hashes": hashes}).mappings().all())
        return {row["key_hash"]: {k: v for k, v in row.items() if k != "key_hash"}
                for row in rows}


# Built once: constructing and cache-keying the statement cost more than running it.
_ACTIVE_KEYS = (
    select(ApiKey.key_hash, Tenant.id, Tenant.name, Tenant.created_at, Tenant.safety_action,
           Tenant.safety_threshold)
    .join(Tenant, Tenant.id == ApiKey.tenant_id)
    .where(ApiKey.key_hash.in_(bindparam("hashes", expanding=True)), ApiKey.revoked_at.is_(None))
)

# The same tenant row gives the same detached object: requests only read it, and building one
# (instrumented attributes, then detaching) cost as much as the query. A changed row (a new
# safety policy) is another key here, so it is never served stale.
_TENANTS: dict[tuple[object, ...], Tenant] = {}
_MAX_TENANTS = 4096


def _detached_tenant(row: dict[str, object]) -> Tenant:
    """A Tenant as if loaded and its session closed: readable, never inserted by accident."""
    key = tuple(row.items())
    tenant = _TENANTS.get(key)
    if tenant is None:
        tenant = Tenant(**row)
        make_transient_to_detached(tenant)
        if len(_TENANTS) >= _MAX_TENANTS:
            _TENANTS.clear()
        _TENANTS[key] = tenant
    return tenant


async def authenticate(*, lookups: ApiKeyLookups, authorization: str | None) -> Tenant:
    if not authorization:
        raise Unauthorized("missing Authorization: Bearer <api key>", code="missing_api_key")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("use Authorization: Bearer <api key>", code="invalid_api_key")
    tenant = await lookups.tenant(hash_key(token.strip()))
    if tenant is None:
        raise Unauthorized("unknown or revoked API key", code="invalid_api_key")
    return tenant


async def provision_api_key(*, database_url: str, tenant_name: str, name: str = "") -> str:
    """Operator path (CLI, scripts): migrate the database if needed, then create a key."""
    from services.gateway.db.session import make_engine, make_sessionmaker, migrate

    engine = make_engine(database_url)
    try:
        await migrate(engine)
        async with make_sessionmaker(engine)() as session:
            return await create_api_key(session=session, tenant_name=tenant_name, name=name)
    finally:
        await engine.dispose()


async def set_safety_policy(
    *, database_url: str, tenant_name: str, action: str | None, threshold: float = 0.8,
) -> None:
    """Operator path: turn a tenant's output safety filter on (blur/withhold) or off (None)."""
    from services.gateway.db.session import make_engine, make_sessionmaker, migrate

    if action not in (None, "blur", "withhold"):
        raise ValueError("action must be blur, withhold or None")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError("threshold must be within [0, 1]")
    engine = make_engine(database_url)
    try:
        await migrate(engine)
        async with make_sessionmaker(engine)() as session:
            tenant = await session.scalar(select(Tenant).where(Tenant.name == tenant_name))
            if tenant is None:
                raise ValueError(f"no tenant {tenant_name!r}")
            tenant.safety_action = action
            tenant.safety_threshold = threshold
            await session.commit()
    finally:
        await engine.dispose()


async def list_api_keys(*, database_url: str, tenant_name: str | None = None) -> list[ApiKey]:
    """Operator path: every key (revoked ones too, so an audit sees them), oldest first."""
    from services.gateway.db.session import make_engine, make_sessionmaker, migrate

    engine = make_engine(database_url)
    try:
        await migrate(engine)
        async with make_sessionmaker(engine)() as session:
            query = select(ApiKey).join(Tenant).order_by(ApiKey.created_at, ApiKey.id)
            if tenant_name is not None:
                query = query.where(Tenant.name == tenant_name)
            return list(await session.scalars(query))
    finally:
        await engine.dispose()


async def revoke_api_key(*, database_url: str, key: str) -> ApiKey:
    """Operator path: revoke by id, by the prefix `keys list` shows, or by the whole key.

    A prefix that matches several keys revokes none: revoking the wrong tenant's key is
    worse than asking for the id.
    """
    from services.gateway.db.session import make_engine, make_sessionmaker, migrate

    engine = make_engine(database_url)
    try:
        await migrate(engine)
        async with make_sessionmaker(engine)() as session:
            matches = list(await session.scalars(select(ApiKey).where(
                (ApiKey.id == key) | (ApiKey.prefix == key) | (ApiKey.key_hash == hash_key(key))
            )))
            if not matches:
                raise LookupError(f"no API key with id or prefix {key!r}")
            if len(matches) > 1:
                raise LookupError(f"{len(matches)} keys have the prefix {key!r}; use the id")
            found: ApiKey = matches[0]
            if found.revoked_at is None:
                found.revoked_at = utcnow()
                await session.commit()
            return found
    finally:
        await engine.dispose()

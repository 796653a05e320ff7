"""API keys: random bearer tokens mapped to tenants; only their SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db.models import ApiKey, Tenant
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


async def authenticate(*, session: AsyncSession, authorization: str | None) -> Tenant:
    if not authorization:
        raise Unauthorized("missing Authorization: Bearer <api key>", code="missing_api_key")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("use Authorization: Bearer <api key>", code="invalid_api_key")
    key = await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(token.strip())))
    if key is None or key.revoked_at is not None:
        raise Unauthorized("unknown or revoked API key", code="invalid_api_key")
    return key.tenant


async def provision_api_key(*, database_url: str, tenant_name: str, name: str = "") -> str:
    """Operator path (CLI, scripts): migrate the database if needed, then create a key."""
    from shared.db.session import make_engine, make_sessionmaker, migrate

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
    from shared.db.session import make_engine, make_sessionmaker, migrate

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

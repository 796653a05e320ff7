"""Engine, sessions and migrations."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"


SQLITE_POOL_SIZE = 40
SERVER_POOL_SIZE = 20


def make_engine(url: str, *, echo: bool = False, pool_size: int | None = 5,
                max_overflow: int = 10) -> AsyncEngine:
    # A pre-ping is a round trip per checkout; a SQLite file has no server to lose the
    # connection, so only server databases pay for it.
    kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": not url.startswith("sqlite")}
    if pool_size is None:
        pool_size = SQLITE_POOL_SIZE if url.startswith("sqlite") else SERVER_POOL_SIZE
    if not url.endswith(":memory:"):
        kwargs.update(pool_size=pool_size, max_overflow=max_overflow)
    if url.startswith("sqlite"):
        db_path = url.split("///", 1)[-1]
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
        # The pool's reset is a ROLLBACK, one more trip through aiosqlite's thread, after the
        # session already ended its transaction; the "reset" hook below rolls back only a
        # connection that is still inside one.
        kwargs["pool_reset_on_return"] = None
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):
        # WAL lets the API read while the event consumer writes; foreign keys are off by default.
        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine.sync_engine, "reset")
        def _rollback_if_open(dbapi_conn: Any, _record: Any, _state: Any) -> None:
            if dbapi_conn.driver_connection.in_transaction:
                dbapi_conn.rollback()

    return engine


class WriteLock:
    """One write transaction at a time from this process, for SQLite.

    SQLite has one writer; a second connection that tries to write waits in SQLite's busy
    handler, which sleeps in growing steps (up to 100 ms a try) rather than queueing. Under a
    burst of submissions those sleeps, not the writes, set the latency (p99 of seconds). The
    hot writers (a submission's insert, the event consumer's batch) take this lock around their
    transaction instead, so they queue here in order and each finds the file free. Server
    databases take row locks and need none: the lock is a no-op there.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._lock = asyncio.Lock() if engine.url.get_backend_name() == "sqlite" else None

    async def __aenter__(self) -> None:
        if self._lock is not None:
            await self._lock.acquire()

    async def __aexit__(self, *_exc: object) -> None:
        if self._lock is not None:
            self._lock.release()


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)


def _upgrade(connection: Connection) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision; safe to run from every replica at start."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)

"""The hot reads (key lookups, job polls and lists) in one trip to the database each.

aiosqlite runs every DBAPI call (execute, fetch, cursor close, rollback) as a separate hand-off
to its connection's thread. A job poll made about six of them, and a profile under wrk put a
third of the gateway's CPU in those hand-offs, not in SQLite. So for a SQLite file, a read here
runs whole in one worker thread on a plain (sync) SQLAlchemy engine over the same file: one
hand-off per read. WAL lets these connections read while the async engine writes, and a SELECT
outside a transaction sees everything committed before it began, so a client that reads its
job right after the 202 finds it. The connections are opened ``query_only``: they never write.

Server databases (asyncpg) have no driver thread to hop through, but each pooled checkout paid
a pre-ping and each connection's return a ROLLBACK: two round trips around a one-statement read.
Their reads run on an engine of their own in autocommit, without the ping; a connection the
server dropped fails its read once, is discarded, and the read runs again on a fresh one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

T = TypeVar("T")

# Threads, and pooled connections, for reads: SQLite reads a page cache in microseconds, so a
# few threads keep up with one event loop; more would only contend for the GIL.
READ_THREADS = 4
SERVER_READ_CONNECTIONS = 10


class Reads:
    """Runs ``fn(connection)`` for a read-only statement or two, in one trip."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sync: Engine | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._sync = sqlite_file_engine(engine, connections=READ_THREADS, read_only=True)
        self._async = engine  # in-memory SQLite: only the engine that made it can see it
        if self._sync is not None:
            self._threads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="sql-read")
        elif engine.url.get_backend_name() != "sqlite":
            self._async = create_async_engine(
                engine.url, pool_size=SERVER_READ_CONNECTIONS, max_overflow=0,
                pool_pre_ping=False, isolation_level="AUTOCOMMIT")

    async def run(self, fn: Callable[[Connection], T]) -> T:
        if self._sync is None:
            try:
                return await self._run_async(fn)
            except DBAPIError as exc:
                if not exc.connection_invalidated:
                    raise
                return await self._run_async(fn)  # the pool discarded the dead connection
        return await asyncio.get_running_loop().run_in_executor(self._threads, self._call, fn)

    async def _run_async(self, fn: Callable[[Connection], T]) -> T:
        async with self._async.connect() as conn:
            return await conn.run_sync(fn)

    def _call(self, fn: Callable[[Connection], T]) -> T:
        assert self._sync is not None
        with self._sync.connect() as conn:
            return fn(conn)

    async def dispose(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)
        if self._sync is not None:
            self._sync.dispose()
        if self._async is not self.engine:
            await self._async.dispose()


def sqlite_file_engine(engine: AsyncEngine, *, connections: int, read_only: bool) -> Engine | None:
    """A sync engine over the async engine's SQLite file (None for other databases and for
    in-memory SQLite, which another engine could not see)."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    sync = create_engine(url.set(drivername="sqlite+pysqlite"), pool_size=connections,
                         max_overflow=0, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(sync, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA query_only={'ON' if read_only else 'OFF'}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return sync

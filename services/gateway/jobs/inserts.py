"""Submissions' job rows, committed together: one transaction for every submission waiting.

A submission must commit its row before it enqueues the task (see ``submission.py``), so each
one waited for a write transaction of its own. On SQLite there is one writer: under a burst the
transactions queued behind each other and the queue, not the inserts, set throughput and
latency. Here the rows that arrive while a commit is in flight go in the next one, as one
multi-row INSERT (group commit): each submission still returns only after its own row is
durable, yet a burst of dozens costs one commit. On a SQLite file the transaction runs whole in
one writer thread on a sync engine (one hand-off instead of aiosqlite's one per call), under the
process's write lock; on a server database it runs on the async engine.

A row the database refuses (two concurrent submissions with one Idempotency-Key) fails only its
own submission: a refused batch is retried one row per transaction, so the others commit.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.gateway.db.models import Job, JobLora
from services.gateway.db.reads import sqlite_file_engine
from services.gateway.db.session import WriteLock

_INSERT = insert(Job)
_LINEAGE = insert(JobLora)


class JobInserts:
    def __init__(self, engine: AsyncEngine, write_lock: WriteLock) -> None:
        self.engine = engine
        self.write_lock = write_lock
        self._sync = sqlite_file_engine(engine, connections=1, read_only=False)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sql-write") if self._sync else None
        self._pending: list[tuple[_Row, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def insert(self, row: dict[str, Any], lineage: list[dict[str, Any]] | None = None) -> None:
        """Return once the row (and its ``job_loras`` lineage rows, in the same transaction) is
        committed; raise what the database said if it was refused."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(((row, lineage or []), future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="job-inserts")
        await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._commit([row for row, _ in batch])
                except IntegrityError:
                    for row, future in batch:
                        await self._commit_alone(row, future)
                    continue
                except BaseException as exc:
                    for _, future in batch:
                        _settle(future, exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for _, future in batch:
                    _settle(future, None)
        finally:
            self._task = None

    async def _commit_alone(self, row: _Row, future: asyncio.Future[None]) -> None:
        try:
            await self._commit([row])
        except Exception as exc:
            _settle(future, exc)
        else:
            _settle(future, None)

    async def _commit(self, rows: list[_Row]) -> None:
        jobs = [job for job, _ in rows]
        lineage = [link for _, links in rows for link in links]
        async with self.write_lock:
            if self._sync is None:
                async with self.engine.begin() as conn:
                    await conn.execute(_INSERT, jobs)
                    if lineage:
                        await conn.execute(_LINEAGE, lineage)
            else:
                await asyncio.get_running_loop().run_in_executor(self._thread, self._commit_here,
                                                                 jobs, lineage)

    def _commit_here(self, jobs: list[dict[str, Any]], lineage: list[dict[str, Any]]) -> None:
        assert self._sync is not None
        with self._sync.begin() as conn:
            conn.execute(_INSERT, jobs)
            if lineage:
                conn.execute(_LINEAGE, lineage)

    def dispose(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        if self._sync is not None:
            self._sync.dispose()


_Row = tuple[dict[str, Any], list[dict[str, Any]]]  # a job row and its lineage rows


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    elif isinstance(exc, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(exc)

"""Grouping compatible jobs into one pipeline call.

arq hands the worker up to ``batch_size`` jobs at once; each job prepares its inputs and
then waits here, briefly, for others with the same :func:`render.batch_key`. A group runs as
one pipeline call (one UNet pass per step for all of them), which is where a GPU's
throughput comes from. Every image has its own seeded generator, so grouping never changes
an image's pixels for its seed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared.errors import JobCanceled

logger = logging.getLogger(__name__)

StepHook = Callable[[int, int], None]


@dataclass
class BatchItem:
    key: tuple[Any, ...]
    payload: Any
    on_step: StepHook
    canceled: bool = False


@dataclass
class _Group:
    items: list[BatchItem] = field(default_factory=list)
    futures: list[asyncio.Future[Any]] = field(default_factory=list)
    full: asyncio.Event = field(default_factory=asyncio.Event)


RunBatch = Callable[[list[BatchItem], StepHook], list[Any]]


class Batcher:
    """``run(items, on_step)`` renders a group in a thread and returns one result per item."""

    def __init__(self, run: RunBatch, *, max_size: int, window_s: float,
                 slot: asyncio.Lock | None = None) -> None:
        self._run = run
        self._slot = slot or asyncio.Lock()
        self.max_size = max(1, max_size)
        self.window_s = window_s
        self._open: dict[tuple[Any, ...], _Group] = {}
        self.batches_run = 0
        self.largest = 0

    async def submit(self, item: BatchItem) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        group = self._open.get(item.key)
        if group is None:
            group = _Group()
            if self.max_size > 1:
                self._open[item.key] = group
            asyncio.create_task(self._run_group(item.key, group))
        group.items.append(item)
        group.futures.append(future)
        if len(group.items) >= self.max_size:
            self._close(item.key, group)
        return await future

    def _close(self, key: tuple[Any, ...], group: _Group) -> None:
        if self._open.get(key) is group:
            del self._open[key]
        group.full.set()

    async def _run_group(self, key: tuple[Any, ...], group: _Group) -> None:
        if self.max_size > 1:
            try:
                await asyncio.wait_for(group.full.wait(), self.window_s)
            except TimeoutError:
                pass
        else:
            await asyncio.sleep(0)  # let submit() add the item
        self._close(key, group)
        items = list(group.items)
        self.batches_run += 1
        self.largest = max(self.largest, len(items))

        def on_step(step: int, total: int) -> None:
            for item in items:
                if item.canceled:
                    continue
                try:
                    item.on_step(step, total)
                except JobCanceled:
                    item.canceled = True
            if all(item.canceled for item in items):
                raise JobCanceled()

        try:
            async with self._slot:
                results = await asyncio.to_thread(self._run, items, on_step)
            if len(results) != len(items):
                raise RuntimeError(f"{len(results)} results for {len(items)} jobs")
        except BaseException as exc:  # noqa: BLE001 - every waiting job must hear about it
            for future in group.futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for item, future, result in zip(items, group.futures, results, strict=True):
            if future.done():
                continue
            if item.canceled:
                future.set_exception(JobCanceled())
            else:
                future.set_result(result)

"""Applying LoRA deletions to this worker: the cached file removed, the adapter unloaded.

The gateway records each deletion in a Redis stream (:mod:`shared.evictions`). This worker
reads it from the start when it starts (so deletions made while it was down apply too), again
before every job that uses LoRAs, and in the background while idle, each time from the last
entry it applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator

from redis.asyncio import Redis

from services.generator.loras import LoraAdapterCache, LoraFiles
from services.generator.pipelines import PipelineCache
from shared.evictions import LORA_EVICTIONS_STREAM, eviction_digest, read_lora_evictions

logger = logging.getLogger(__name__)

_BATCH = 1000  # read_lora_evictions' page size


class LoraEvictor:
    """Follows the evictions stream for one worker's LoRA files and adapters.

    A file an in-flight job has fetched is pinned until the job's render is over: its LoRA
    was deleted after the job was accepted, and the job (which another part of a deletion
    cancels) should not fail because its file vanished between fetch and render. The eviction
    of a pinned file waits for the next look at the stream.
    """

    def __init__(self, *, redis: Redis, files: LoraFiles, adapters: LoraAdapterCache,
                 models: PipelineCache, render_slot: asyncio.Lock) -> None:
        self.redis = redis
        self.files = files
        self.adapters = adapters
        self.models = models
        self.render_slot = render_slot
        self.last_id = "0"
        self.evicted = 0
        self._pins: Counter[str] = Counter()
        self._waiting: set[str] = set()  # evictions held back by a pin
        self._reading = asyncio.Lock()  # one reader advances last_id

    @contextlib.contextmanager
    def pinned(self, sha256s: Iterable[str]) -> Iterator[None]:
        shas = list(sha256s)
        self._pins.update(shas)
        try:
            yield
        finally:
            self._pins.subtract(shas)
            self._pins += Counter()  # drop zero counts

    async def catch_up(self) -> int:
        """Apply every eviction recorded since the last look; returns how many files or
        adapters went. One ``XREAD`` from a stream id when nothing is new."""
        async with self._reading:
            due = {sha for sha in self._waiting if sha not in self._pins}
            digests: set[str] = set()
            while True:
                last, evictions = await read_lora_evictions(self.redis, after=self.last_id)
                digests.update(e.digest for e in evictions)
                self.last_id = last
                if len(evictions) < _BATCH:
                    break
            if digests:  # evictions name files by a digest of their hash: match ours
                held = self.files.cached() | self.adapters.held() | set(self._pins)
                due.update(sha for sha in held if eviction_digest(sha) in digests)
            self._waiting = {sha for sha in self._waiting | due if sha in self._pins}
            due -= self._waiting
            if not due:
                return 0
            async with self.render_slot:  # no render (nor model load) is using an adapter
                removed = await asyncio.to_thread(self._evict, due)
            self.evicted += removed
            return removed

    def _evict(self, sha256s: set[str]) -> int:
        removed = 0
        for model in self.models.loaded_models():
            with model.lock:
                removed += len(self.adapters.unload(model.pipe, sha256s))
        for sha256 in sha256s:
            if self.files.remove(sha256):
                removed += 1
                logger.info("removed the cached file of deleted LoRA %s", sha256[:16])
        return removed

    async def follow(self, *, block_ms: int = 5000) -> None:
        """Apply evictions as they are recorded, for as long as the worker runs."""
        while True:
            try:
                # Only a wake-up: catch_up reads (and applies) what arrived.
                await self.redis.xread({LORA_EVICTIONS_STREAM: self.last_id}, count=1,
                                       block=block_ms)
                await self.catch_up()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - Redis away: the next job catches up anyway
                logger.warning("following LoRA evictions failed; retrying", exc_info=True)
                await asyncio.sleep(1)

"""A deleted LoRA leaves a worker's cache: file removed, adapter unloaded, also for a worker
that was down when it was deleted. Real Redis; a recording stand-in for the pipeline."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from redis.asyncio import Redis
from safetensors.torch import save

from services.devstack import start_redis, stop_child
from services.generator.evictions import LoraEvictor
from services.generator.loras import LoraAdapterCache, LoraFiles, adapter_name
from shared.evictions import record_lora_eviction
from shared.specs import LoraRef


@dataclass(eq=False)  # hashed by identity, as the adapter cache keys pipelines
class RecordingPipe:
    """The adapter calls LoraAdapterCache makes on a diffusers pipeline, recorded."""

    adapters: list[str] = field(default_factory=list)
    lora_enabled: bool = False

    def load_lora_weights(self, state: dict[str, Any], *, adapter_name: str) -> None:
        self.adapters.append(adapter_name)

    def delete_adapters(self, name: str) -> None:
        self.adapters.remove(name)

    def set_adapters(self, names: list[str], adapter_weights: list[float]) -> None:
        pass

    def enable_lora(self) -> None:
        self.lora_enabled = True

    def disable_lora(self) -> None:
        self.lora_enabled = False


@dataclass
class Loaded:
    pipe: RecordingPipe
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Models:
    models: list[Loaded]

    def loaded_models(self) -> list[Loaded]:
        return self.models


def lora_file(seed: int) -> tuple[str, bytes]:
    data = save({"unet.x.lora_A.weight": torch.full((2, 2), float(seed))})
    return hashlib.sha256(data).hexdigest(), data


def evictor_for(redis: Redis, root: Path, *pipes: RecordingPipe) -> LoraEvictor:
    files = LoraFiles(root)
    return LoraEvictor(redis=redis, files=files, adapters=LoraAdapterCache(files),
                       models=Models([Loaded(pipe) for pipe in pipes]),  # type: ignore[arg-type]
                       render_slot=asyncio.Lock())


def test_evictions_apply_live_at_startup_and_after_pins(tmp_path: Path) -> None:
    deleted, deleted_data = lora_file(1)
    kept, kept_data = lora_file(2)

    async def check(url: str) -> None:
        redis = Redis.from_url(url)
        try:
            # A running worker with both LoRAs cached and loaded.
            pipe = RecordingPipe()
            live = evictor_for(redis, tmp_path / "live", pipe)
            assert await live.catch_up() == 0
            for sha, data in ((deleted, deleted_data), (kept, kept_data)):
                live.files.save(sha, data)
            refs = [LoraRef(id=f"l{i}", name=f"l{i}", key="k", sha256=sha, weight=1.0)
                    for i, sha in enumerate((deleted, kept))]
            live.adapters.activate(pipe, refs)
            # A worker down since before the deletion, with the file cached.
            down = tmp_path / "down"
            LoraFiles(down).save(deleted, deleted_data)

            await record_lora_eviction(redis, sha256=deleted)
            assert await live.catch_up() == 2  # the adapter and the file
            assert not live.files.has(deleted) and live.files.has(kept)
            assert pipe.adapters == [adapter_name(kept)] and not pipe.lora_enabled
            assert live.adapters.loaded_names(pipe) == [adapter_name(kept)]
            assert await live.catch_up() == 0  # nothing new since the last look

            # The worker that was down applies it when it starts.
            restarted = evictor_for(redis, down)
            await restarted.catch_up()
            assert not restarted.files.has(deleted)

            # A file an in-flight job has fetched stays until its render is over.
            live.files.save(deleted, deleted_data)
            with live.pinned([deleted]):
                await record_lora_eviction(redis, sha256=deleted)
                assert await live.catch_up() == 0 and live.files.has(deleted)
            assert await live.catch_up() == 1 and not live.files.has(deleted)

            # The background follower applies one as soon as it is recorded.
            follower = asyncio.create_task(live.follow(block_ms=200))
            live.files.save(deleted, deleted_data)
            await record_lora_eviction(redis, sha256=deleted)
            for _ in range(50):
                if not live.files.has(deleted):
                    break
                await asyncio.sleep(0.05)
            follower.cancel()
            assert not live.files.has(deleted)
        finally:
            await redis.aclose()

    child, url = start_redis(tmp_path / "redis")
    try:
        asyncio.run(check(url))
    finally:
        stop_child(child)

"""The generator worker's context: the shared clients plus the model caches, the render slot
and the batcher, built once at startup (see :mod:`services.workerctx`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from services.generator.batching import Batcher
from services.generator.evictions import LoraEvictor
from services.generator.loras import LoraAdapterCache, LoraFiles
from services.generator.pipelines import PipelineCache
from services.workerctx import WorkerContext


class LazySafetyFilter:
    """The classifier loads on the first job of a tenant that has the filter on."""

    def __init__(self) -> None:
        self._filter: Any = None

    def apply(self, images: list[Image.Image], *, threshold: float, action: str) -> list[Any]:
        if self._filter is None:
            from services.generator.safety import SafetyFilter

            self._filter = SafetyFilter()
        return self._filter.apply(images, threshold=threshold, action=action)  # type: ignore[no-any-return]


@dataclass
class GeneratorContext(WorkerContext):
    cache: PipelineCache = field(kw_only=True)
    lora_files: LoraFiles = field(kw_only=True)
    lora_cache: LoraAdapterCache = field(kw_only=True)
    lora_evictor: LoraEvictor = field(kw_only=True)
    # One pipeline call at a time per worker (one GPU): arq may hand us batch_size jobs at
    # once, but only to group them; loading another model also waits for the slot, so a
    # model is never evicted while it renders.
    render_slot: asyncio.Lock = field(kw_only=True)
    batcher: Batcher = field(kw_only=True)
    safety: LazySafetyFilter = field(kw_only=True)

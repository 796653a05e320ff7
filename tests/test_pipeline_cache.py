"""The worker's model cache: derived pipelines share weights; a byte budget evicts LRU."""

from __future__ import annotations

from pathlib import Path

from services.generator.pipelines import PipelineCache
from shared.models import ModelRegistry

REGISTRY = ModelRegistry.load()


def test_derived_pipelines_share_the_base_weights(model_cache: Path) -> None:
    cache = PipelineCache(registry=REGISTRY, cache_dir=model_cache)
    loaded = cache.get("tiny-sd15")
    base = loaded.weight_bytes()
    img2img = loaded.pipeline_for("img2img")
    assert img2img.unet is loaded.pipe.unet and loaded.weight_bytes() == base
    assert loaded.pipeline_for("img2img") is img2img  # derived once
    loaded.pipeline_for("txt2img", ("canny",))
    assert loaded.weight_bytes() > base and loaded.derived_loads == 1  # only the ControlNet


def test_byte_budget_evicts_least_recently_used(model_cache: Path) -> None:
    unlimited = PipelineCache(registry=REGISTRY, cache_dir=model_cache, max_loaded=4)
    unlimited.get("tiny-sd15")
    unlimited.get("tiny-sdxl")
    assert unlimited.loaded_names() == ["tiny-sd15", "tiny-sdxl"]
    one_model = unlimited.loaded_bytes() - 1
    budget = PipelineCache(registry=REGISTRY, cache_dir=model_cache, max_loaded=4,
                           max_bytes=one_model)
    budget.get("tiny-sd15")
    budget.get("tiny-sdxl")
    assert budget.loaded_names() == ["tiny-sdxl"]
    budget.get("tiny-sd15")
    assert budget.loaded_names() == ["tiny-sd15"] and budget.misses == 3

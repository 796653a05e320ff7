"""The model presets as clients see them: limits, options and whether the weights are there.

Nothing here loads a model: presence is a look at the filesystem from the gateway, which is
what an operator needs to see a typo in a path or a hub id missing from the cache.
"""

from __future__ import annotations

from pathlib import Path

from services.gateway.models.schemas import (
    InpaintingOut,
    ModelOrigin,
    ModelOut,
    ModelPage,
    WeightsFormat,
)
from shared.models import ModelPreset, ModelRegistry, PresetOrigin


def weights_format(source: str) -> WeightsFormat:
    if source.startswith("builtin:"):
        return WeightsFormat.BUILTIN
    path = Path(source)
    if path.is_dir():  # a folder may be named x.safetensors; the scan takes it for what it holds
        return WeightsFormat.DIFFUSERS_FOLDER
    if path.suffix.lower() == ".safetensors":  # the scan takes MODEL.SAFETENSORS too
        return WeightsFormat.SINGLE_FILE
    if source.startswith(("/", "./", "../")):
        return WeightsFormat.DIFFUSERS_FOLDER
    return WeightsFormat.HUB


def in_hub_cache(repo_id: str, model_cache: Path) -> bool:
    """Whether a snapshot of ``repo_id`` is in the model cache (huggingface_hub's layout,
    ``models--<org>--<name>/snapshots/<commit>/``), without importing it."""
    snapshots = model_cache / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    try:
        return any(any(snapshot.iterdir()) for snapshot in snapshots.iterdir()
                   if snapshot.is_dir())
    except OSError:
        return False


def weights_present(source: str, model_cache: Path) -> bool:
    kind = weights_format(source)
    if kind == WeightsFormat.BUILTIN:
        return True  # built from configs on first use
    if kind == WeightsFormat.HUB:
        return in_hub_cache(source, model_cache)
    path = Path(source)
    return path.is_file() if kind == WeightsFormat.SINGLE_FILE else (
        (path / "model_index.json").is_file())


def shown_source(preset: ModelPreset, origin: PresetOrigin, models_dir: Path | None) -> str:
    """The source as the operator wrote it; a scanned model's path is relative to the models
    folder, so the listing does not reveal where the operator keeps that folder."""
    if origin == PresetOrigin.MODELS_DIR and models_dir is not None:
        try:
            return Path(preset.source).relative_to(models_dir).as_posix()
        except ValueError:
            return Path(preset.source).name
    return preset.source


def model_out(preset: ModelPreset, *, registry: ModelRegistry, model_cache: Path) -> ModelOut:
    limits = preset.limits
    origin = registry.origins.get(preset.name, PresetOrigin.BUILTIN)
    return ModelOut(
        name=preset.name, family=preset.family.value, description=preset.description,
        origin=ModelOrigin(origin.value), source=shown_source(preset, origin, registry.models_dir),
        format=weights_format(preset.source),
        weights_present=weights_present(preset.source, model_cache),
        default_width=limits.default_size, default_height=limits.default_size,
        min_width=limits.min_size, min_height=limits.min_size,
        max_width=limits.max_size, max_height=limits.max_size,
        size_multiple=limits.size_multiple, default_steps=limits.default_steps,
        max_steps=limits.max_steps, default_guidance=limits.default_guidance,
        schedulers=list(limits.schedulers),
        controlnets=sorted(kind.value for kind in preset.controlnets),
        inpainting=InpaintingOut(supported=True, dedicated=preset.inpaint_source is not None),
        lora_dim=preset.lora_dim,
    )


def list_models(*, registry: ModelRegistry, model_cache: Path, default_model: str) -> ModelPage:
    """Every preset by name; each presence check is a stat or two."""
    return ModelPage(
        items=[model_out(preset, registry=registry, model_cache=model_cache)
               for preset in sorted(registry, key=lambda preset: preset.name)],
        default_model=default_model,
    )

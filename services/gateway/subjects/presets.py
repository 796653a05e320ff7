"""Training recipes for a subject: what ``quick`` and ``standard`` mean, and overrides of them.

``standard`` is the old application's recipe: every photo repeated 300 times for one epoch at
batch 1, so its 5 photos trained 1,500 steps, on SD1.5 at 512 px. ``quick`` trains a handful of
steps at the smallest size, for tests and CPUs: it proves the flow, not a likeness.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import TypeAdapter, ValidationError

from services.gateway.trainings.schemas import TrainingRequest
from shared.errors import ValidationFailed
from shared.training import TrainingSpec

STANDARD_REPEATS = 300  # the old application's 300 iterations per photo

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "base_model": "tiny-sd15",
        "data": {"resolution": 64, "batch_size": 1, "min_bucket_reso": 64,
                 "max_bucket_reso": 128, "bucket_reso_steps": 64},
        "network": {"rank": 4, "alpha": 4},
        "optim": {"learning_rate": 0.005, "max_train_steps": 4, "seed": 1},
        "save": {"save_state": False},
    },
    "standard": {
        "base_model": "sd15",
        "data": {"resolution": 512, "batch_size": 1},
        "network": {"rank": 16, "alpha": 8},
        "optim": {"learning_rate": 1e-4, "unet_lr": 1e-4, "lr_scheduler": "constant",
                  "optimizer": "AdamW", "max_train_epochs": 1, "seed": 42},
        "save": {"save_state": False},
    },
}
# how often each photo is repeated per epoch (the kohya folder's `<repeats>_` prefix)
REPEATS = {"quick": 1, "standard": STANDARD_REPEATS}

# The training fields a subject sets itself: an override of them is refused by name.
_OWN_FIELDS = {"name": "the subject's LoRA is named after the subject",
               "dataset_id": "the subject's photos are the dataset",
               "reg_dataset_id": "a subject trains on its photos alone",
               "dataset_config": "the subject's photos are one kohya folder",
               "resume_from": "a subject's training starts fresh",
               "webhook": "give the subject's own `webhook`"}

_REQUEST: TypeAdapter[TrainingSpec] = TypeAdapter(TrainingRequest)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def training_options(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The preset with ``overrides`` laid over it, checked as a training request is (the
    trainer's every rule, unknown fields included); errors are named ``overrides.<path>``.

    Returns the options as a training request's JSON less ``name`` and ``dataset_id``, which
    the subject fills in when its training starts."""
    errors = [{"field": f"overrides.{key}", "message": f"set by the subject: {why}"}
              for key, why in _OWN_FIELDS.items() if key in overrides]
    diffusion = overrides.get("diffusion")
    if isinstance(diffusion, dict) and diffusion.get("cache_latents_to_disk"):
        errors.append({"field": "overrides.diffusion.cache_latents_to_disk", "message": (
            "a subject's latents are derived from a person's photos and are never kept on a "
            "worker's disk; diffusion.cache_latents (in memory) is allowed")})
    if errors:
        raise ValidationFailed(errors)
    options = _merge(PRESETS[preset], overrides)
    try:
        spec = _REQUEST.validate_python({**options, "name": "subject", "dataset_id": "subject"})
    except ValidationError as exc:
        raise ValidationFailed([
            {"field": ".".join(["overrides", *(str(p) for p in error["loc"])]),
             "message": error["msg"]} for error in exc.errors()]) from exc
    checked = spec.model_dump(mode="json", exclude={"name", "dataset_id", "webhook"})
    return {key: value for key, value in checked.items() if key not in _OWN_FIELDS}

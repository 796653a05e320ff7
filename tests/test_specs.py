"""Spec rules that need the model registry, and settings that must refuse to start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.errors import ValidationFailed
from shared.models import ModelRegistry, canonical_scheduler
from shared.settings import Settings
from shared.specs import GenerationSpec, resolve_generation

REGISTRY = ModelRegistry.load()


def resolve(**fields: object) -> GenerationSpec:
    return resolve_generation(GenerationSpec(prompt="p", **fields),  # type: ignore[arg-type]
                              registry=REGISTRY, default_model="tiny-sd15")


def test_family_defaults_fill_the_spec() -> None:
    flux = resolve(model="flux-schnell")
    assert (flux.width, flux.steps, flux.guidance_scale) == (1024, 4, 0.0)
    sd15 = resolve(model="sd15")
    assert (sd15.width, sd15.height, sd15.steps, sd15.guidance_scale) == (512, 512, 25, 7.5)
    assert sd15.seed is not None and 0 <= sd15.seed < 2**32


def test_scheduler_names_are_matched_like_people_type_them() -> None:
    assert canonical_scheduler("euler  A") == "Euler a"
    assert canonical_scheduler("dpm++ 2m karras") == "DPM++ 2M Karras"
    assert resolve(scheduler="ddim").scheduler == "DDIM"
    with pytest.raises(ValidationFailed) as info:
        resolve(model="flux-dev", scheduler="DDIM")  # flow-matching models have one sampler
    assert info.value.errors[0]["field"] == "scheduler"


def test_model_limits_are_checked_before_queueing() -> None:
    with pytest.raises(ValidationFailed) as info:
        resolve(model="flux-schnell", steps=20, width=128)
    assert {e["field"] for e in info.value.errors} == {"steps", "width"}
    with pytest.raises(ValidationError):
        GenerationSpec(prompt="p", height=100)  # not a multiple of 8


def test_models_file_adds_presets(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nname = "mine"\nfamily = "sdxl"\nsource = "/weights/mine"\n')
    registry = ModelRegistry.load(path)
    assert registry.get("mine") is not None and registry.get("tiny-sd15") is not None
    assert registry.get("mine").limits.default_size == 1024  # type: ignore[union-attr]


def test_production_refuses_the_development_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOMIS_ENV", "production")
    with pytest.raises(ValidationError, match="SIGNING_SECRET"):
        Settings()
    monkeypatch.setenv("LOOMIS_GATEWAY__SIGNING_SECRET", "a-real-secret")
    assert Settings().env == "production"

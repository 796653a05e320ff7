"""The model plumbing every worker shares: settings, source resolution, device choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.models.device import pick_device
from services.models.sources import ModelSources
from services.models.weights import hashes_dir, weights_hash
from services.tagger.worker import TaggerModels
from shared.errors import ModelUnavailable
from shared.settings import Settings

LEGACY_ENV = {
    "LOOMIS_GENERATOR__MODEL_CACHE": "/old/cache",
    "LOOMIS_GENERATOR__ALLOW_DOWNLOADS": "true",
    "LOOMIS_GENERATOR__MODELS_FILE": "/old/models.toml",
    "LOOMIS_GENERATOR__MODELS_DIR": "/old/Stable-diffusion",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith("LOOMIS_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_model_settings_read_their_own_names(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LOOMIS_MODELS__CACHE_DIR", "/new/cache")
    clean_env.setenv("LOOMIS_MODELS__ALLOW_DOWNLOADS", "true")
    clean_env.setenv("LOOMIS_MODELS__MODELS_FILE", "/new/models.toml")
    clean_env.setenv("LOOMIS_MODELS__MODELS_DIR", "/new/Stable-diffusion")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.models.cache_dir == Path("/new/cache")
    assert settings.model_cache == Path("/new/cache")
    assert settings.models.allow_downloads is True
    assert settings.models.models_file == Path("/new/models.toml")
    assert settings.models.models_dir == Path("/new/Stable-diffusion")


def test_model_settings_still_read_the_generator_names(clean_env: pytest.MonkeyPatch) -> None:
    """Deployments written before the move keep their cache, presets and downloads."""
    for name, value in LEGACY_ENV.items():
        clean_env.setenv(name, value)
    clean_env.setenv("LOOMIS_GENERATOR__BATCH_SIZE", "3")  # the generator's own stay its own
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.model_cache == Path("/old/cache")
    assert settings.models.allow_downloads is True
    assert settings.models.models_file == Path("/old/models.toml")
    assert settings.models.models_dir == Path("/old/Stable-diffusion")
    assert settings.generator.batch_size == 3
    assert not hasattr(settings.generator, "allow_downloads")


def test_a_new_model_setting_wins_over_its_old_name(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in LEGACY_ENV.items():
        clean_env.setenv(name, value)
    clean_env.setenv("LOOMIS_MODELS__CACHE_DIR", "/new/cache")
    clean_env.setenv("LOOMIS_MODELS__ALLOW_DOWNLOADS", "false")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.model_cache == Path("/new/cache")
    assert settings.models.allow_downloads is False
    assert settings.models.models_dir == Path("/old/Stable-diffusion")


def test_auto_device_prefers_cuda_then_mps_unless_mps_is_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == "mps"
    assert pick_device("auto", mps=False) == "cpu"  # the trainer's and tagger's auto
    assert pick_device("cuda:1", mps=False) == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == "cuda"
    assert pick_device("auto", mps=False) == "cuda"
    assert pick_device("cpu") == "cpu"


def test_sources_resolve_directories_and_files_as_they_are(tmp_path: Path) -> None:
    sources = ModelSources(cache_dir=tmp_path / "cache")
    folder = tmp_path / "model"
    folder.mkdir()
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights")
    assert sources.resolve(str(folder), name="m") == (folder, None)
    assert sources.resolve(str(checkpoint), name="m") == (checkpoint, None)
    with pytest.raises(ModelUnavailable, match="weights for 'm': .*gone.safetensors does not exist"):
        sources.resolve(str(tmp_path / "gone.safetensors"), name="m")


def test_a_missing_hub_model_names_the_downloads_setting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sources = ModelSources(cache_dir=tmp_path)
    with pytest.raises(ModelUnavailable, match=r"weights for 'org/absent' \(org/absent\) are not "
                       r"available \(downloads are off: .*LOOMIS_MODELS__ALLOW_DOWNLOADS=true\)"):
        sources.path("org/absent")


def test_unknown_builtin_names_every_built_in_model(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="no builder for 'tiny-nonexistent'; known: tiny-sd15.*tiny-wd14"):
        ModelSources(cache_dir=tmp_path).path("builtin:tiny-nonexistent")


def test_the_tagger_resolves_through_the_shared_sources(clean_env: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    clean_env.setenv("LOOMIS_GENERATOR__ALLOW_DOWNLOADS", "true")  # the old name reaches it too
    clean_env.setenv("LOOMIS_MODELS__CACHE_DIR", str(tmp_path))
    models = TaggerModels(Settings(_env_file=None))  # type: ignore[call-arg]
    assert models.sources.cache_dir == tmp_path
    assert models.sources.allow_downloads is True
    folder = tmp_path / "wd14"
    folder.mkdir()
    assert models._resolve(str(folder)) == folder


def test_weights_hash_keeps_per_file_hashes_in_the_cache(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    sources = ModelSources(cache_dir=tmp_path / "cache")
    digest = sources.weights_hash(folder)
    assert digest == weights_hash(folder, hashes_dir(tmp_path / "cache"))
    assert len(list(hashes_dir(tmp_path / "cache").glob("*.json"))) == 1

"""Which weight files a model folder loads, and their SHA-256.

Every worker records the hash of the base model it ran (the generator in its manifests, the
trainer in a LoRA's metadata), so all of them hash the same files the same way, and share the
per-file hash cache under ``<model_cache>/.hashes``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".gguf")
HASHES_DIR = ".hashes"

# diffusers' NSFW checker blacks out a flagged image and the job would still succeed with
# nothing saying why; Loomis filters per tenant instead (services/generator/safety.py), and
# the checker costs ~1.3 GB and ~1 s per image. The feature extractor only feeds it.
_SAFETY_COMPONENTS = ("safety_checker", "feature_extractor")
# The file names diffusers (first) and transformers save a component's weights under, in the
# order from_pretrained looks for them; variants (``*.fp16.safetensors``) are not read
# without ``variant=``, and root-level single-file checkpoints never are.
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_WEIGHT_FORMATS = (".safetensors", ".bin")


def model_index(folder: Path) -> dict[str, Any]:
    index = folder / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def listed_components(index: dict[str, Any]) -> list[str]:
    """The components ``model_index.json`` asks to load (``[null, null]`` entries are off)."""
    return [name for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and len(value) == 2
            and value[0] is not None]


def component_weight_files(folder: Path) -> list[Path]:
    """The weight files ``from_pretrained`` reads from one component folder (shards by their
    index), or nothing for a component without weights (tokenizer, scheduler)."""
    for suffix in _WEIGHT_FORMATS:
        for stem in _WEIGHT_STEMS:
            sharded = folder / f"{stem}{suffix}.index.json"
            if sharded.is_file():
                shards = set(json.loads(sharded.read_text())["weight_map"].values())
                return [sharded, *sorted(folder / shard for shard in shards)]
            single = folder / f"{stem}{suffix}"
            if single.is_file():
                return [single]
    return []


def loaded_weight_files(path: Path, components: list[str] | None = None) -> list[Path]:
    """The weight files a pipeline loads from ``path``: a single file, each component's own
    files for a diffusers folder, else (a bare model folder) what its root holds."""
    if path.is_file():
        return [path]
    if components is None:
        components = [name for name in listed_components(model_index(path))
                      if name not in _SAFETY_COMPONENTS]
    if components:
        return [file for name in sorted(components)
                for file in component_weight_files(path / name)]
    return component_weight_files(path)


def _file_sha256(path: Path, sidecar_dir: Path) -> str:
    """A file's SHA-256, cached by (path, size, mtime): a real model is GBs, and presets that
    share files (a base and its inpainting variant's VAE) hash them once."""
    stat = path.stat()
    resolved = str(path.resolve())
    key = [resolved, stat.st_size, stat.st_mtime_ns]
    sidecar = sidecar_dir / (hashlib.sha1(resolved.encode()).hexdigest() + ".json")
    if sidecar.exists():
        cached = json.loads(sidecar.read_text())
        if cached.get("key") == key:
            return str(cached["sha256"])
    with path.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    sidecar_dir.mkdir(parents=True, exist_ok=True)
    sidecar.write_text(json.dumps({"key": key, "sha256": digest}))
    return digest


def weights_hash(path: Path, sidecar_dir: Path, components: list[str] | None = None) -> str:
    """SHA-256 over the weight files the pipeline loads (names and contents), not over every
    file in the folder: a cloned repository also holds multi-GB single-file checkpoints and
    fp16 variants that are never read."""
    root = path.parent if path.is_file() else path
    files = loaded_weight_files(path, components)
    if not files:  # nothing we recognise: every weight file, as before
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(root).as_posix()}\0"
                      f"{_file_sha256(file, sidecar_dir)}\n".encode())
    return digest.hexdigest()


def hashes_dir(cache_dir: Path) -> Path:
    """Where a model cache keeps its per-file hashes, shared by every worker using it."""
    return cache_dir / HASHES_DIR

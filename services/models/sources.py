"""Turning a model source into local files, the same way in every worker.

A source is ``builtin:<name>`` (a tiny model built into the model cache on first use), a
local directory or single-file checkpoint (used as it is), or a hub id (a snapshot in
``<model_cache>/hub``, downloaded only when settings allow it). The generator loads
pipelines from the result, the trainer trains on it, the tagger loads its captioner and
tagger from it; none of them resolves a source any other way.
"""

from __future__ import annotations

from pathlib import Path

from services.models.tiny import ensure_builtin
from services.models.weights import hashes_dir, weights_hash
from shared.errors import ModelUnavailable

HUB_DIR = "hub"
DOWNLOADS_SETTING = "LOOMIS_MODELS__ALLOW_DOWNLOADS"


class ModelSources:
    """One model cache: where sources resolve to and where their weight hashes are kept."""

    def __init__(self, *, cache_dir: Path, allow_downloads: bool = False) -> None:
        self.cache_dir = cache_dir
        self.allow_downloads = allow_downloads

    def path(self, source: str) -> Path:
        """A companion's or a worker model's source as local files, named by the source."""
        return self.resolve(source, name=source)[0]

    def resolve(self, source: str, *, name: str,
                revision: str | None = None) -> tuple[Path, str | None]:
        """Local files for ``source`` and, for a hub snapshot, the commit they are from.

        ``name`` is what errors call the model (a preset's name, else the source itself).
        """
        if source.startswith("builtin:"):
            return ensure_builtin(source.removeprefix("builtin:"), self.cache_dir), None
        if Path(source).is_dir():
            return Path(source), None
        if Path(source).is_file():  # a single-file checkpoint
            return Path(source), None
        if source.endswith(".safetensors") or source.startswith(("/", "./", "../")):
            raise ModelUnavailable(f"weights for {name!r}: {source} does not exist")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            path = Path(snapshot_download(
                source, revision=revision, cache_dir=self.cache_dir / HUB_DIR,
                local_files_only=not self.allow_downloads,
            ))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
            hint = "" if self.allow_downloads else (
                " (downloads are off: put the weights in the model cache or set "
                f"{DOWNLOADS_SETTING}=true)")
            raise ModelUnavailable(f"weights for {name!r} ({source}) are not available"
                                   f"{hint}") from exc
        return path, path.name

    def weights_hash(self, path: Path, components: list[str] | None = None) -> str:
        """SHA-256 of the weights loaded from ``path``, per-file hashes cached in this cache."""
        return weights_hash(path, hashes_dir(self.cache_dir), components)

"""Building a locally made model into the model cache exactly once, even under races."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path


def build_into_cache(
    name: str, cache_dir: Path, *, builders: Mapping[str, Callable[[Path], None]],
    is_built: Callable[[Path], bool],
) -> Path:
    """Build ``name`` into ``cache_dir`` unless it is there; safe when several workers race.

    The builder writes a staging folder that is renamed into place in one step, so a reader
    sees no model or a whole one, and a loser of the race keeps the winner's copy.
    """
    target = cache_dir / name
    if is_built(target):
        return target
    if name not in builders:
        raise KeyError(f"no builder for {name!r}; known: {', '.join(builders)}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        builders[name](staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not is_built(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

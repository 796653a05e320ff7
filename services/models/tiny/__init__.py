"""Tiny models with random weights, built from configs into the model cache on first use.

``builtin:<name>`` sources name them: the diffusion models and their companions
(``diffusion``) for the generator and trainer, the captioner and tagger (``tagging``) for the
tagger. Each module imports only when one of its models is asked for.
"""

from __future__ import annotations

from pathlib import Path


def ensure_builtin(name: str, cache_dir: Path) -> Path:
    """The folder of built-in model ``name`` in ``cache_dir``, built there first if missing."""
    from services.models.tiny import diffusion, tagging

    if name in tagging.BUILDERS:
        return tagging.ensure_tagger_model(name, cache_dir)
    if name in diffusion.BUILDERS:
        return diffusion.ensure_tiny_model(name, cache_dir)
    raise KeyError(f"no builder for {name!r}; known: "
                   f"{', '.join([*diffusion.BUILDERS, *tagging.BUILDERS])}")

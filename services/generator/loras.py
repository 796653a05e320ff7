"""LoRA adapters on a loaded pipeline: loaded once, switched by weight, never fused.

Switching is ``set_adapters`` on modules that stay in memory, so changing LoRA (or its
weight) costs no reload of the base model. Adapters are never fused into the base weights:
disabling them gives back the base output bit for bit (fuse/unfuse would leave ~1e-6
rounding behind).
"""

from __future__ import annotations

import logging
import os
import tempfile
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import JobFailure
from shared.specs import LoraRef

logger = logging.getLogger(__name__)


class LoraLoadFailed(JobFailure):
    code = "lora_invalid"


def adapter_name(sha256: str) -> str:
    """Content-addressed: the same file under two ids (or re-uploaded) is loaded once."""
    return f"lora_{sha256[:16]}"


@dataclass
class LoraFiles:
    """A local copy of each LoRA file, by content hash, so a worker downloads each once."""

    root: Path

    def path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.safetensors"

    def has(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def save(self, sha256: str, data: bytes) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(sha256)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target


class LoraAdapterCache:
    """Which adapters each pipeline holds, least recently used first, at most ``max_loaded``."""

    def __init__(self, files: LoraFiles, *, max_loaded: int = 8) -> None:
        self.files = files
        self.max_loaded = max(1, max_loaded)
        # Keyed by the pipeline object itself (weakly): an evicted pipeline's state goes with
        # it, and a new pipeline can never inherit it through a recycled id().
        self._loaded: weakref.WeakKeyDictionary[Any, OrderedDict[str, str]] = (
            weakref.WeakKeyDictionary())
        self._active: weakref.WeakKeyDictionary[Any, tuple[tuple[str, float], ...]] = (
            weakref.WeakKeyDictionary())
        self.loads = 0

    def loaded_names(self, pipe: Any) -> list[str]:
        return list(self._loaded.get(pipe, {}))

    def activate(self, pipe: Any, loras: list[LoraRef]) -> list[dict[str, Any]]:
        """Make exactly ``loras`` active on ``pipe`` with their weights; returns what was used.

        Called with the model's lock held: adapters are state on shared modules.
        """
        held = self._loaded.setdefault(pipe, OrderedDict())
        if not loras:
            if held and self._active.get(pipe):
                pipe.disable_lora()
            self._active[pipe] = ()
            return []
        names: list[str] = []
        for lora in loras:
            name = adapter_name(lora.sha256)
            if name not in held:
                self._active.pop(pipe, None)  # peft changes the active set when it loads
                self._load(pipe, lora, name)
                held[name] = lora.sha256
            held.move_to_end(name)
            names.append(name)
        while len(held) > max(self.max_loaded, len(names)):
            evicted, _ = held.popitem(last=False)
            pipe.delete_adapters(evicted)
            self._active.pop(pipe, None)
            logger.info("unloaded LoRA adapter %s", evicted)
        wanted = tuple(zip(names, (lora.weight for lora in loras), strict=True))
        if self._active.get(pipe) != wanted:  # unchanged: skip the ~5 ms re-application
            pipe.enable_lora()
            pipe.set_adapters(names, adapter_weights=[lora.weight for lora in loras])
            self._active[pipe] = wanted
        return [{"id": lora.id, "name": lora.name, "sha256": lora.sha256, "weight": lora.weight,
                 "adapter": name} for lora, name in zip(loras, names, strict=True)]

    def _load(self, pipe: Any, lora: LoraRef, name: str) -> None:
        from safetensors.torch import load_file

        path = self.files.path(lora.sha256)
        try:
            state = load_file(str(path))
            pipe.load_lora_weights(state, adapter_name=name)
        except Exception as exc:  # diffusers/peft raise many types for a file that does not fit
            try:
                pipe.delete_adapters(name)
            except Exception:  # noqa: BLE001 - it may not have been registered at all
                logger.debug("no partial adapter %s to remove", name)
            raise LoraLoadFailed(f"LoRA {lora.name!r} could not be applied to this model: "
                                 f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        self.loads += 1
        logger.info("loaded LoRA %s as adapter %s", lora.name, name)

"""LoRA adapters on a loaded pipeline: loaded once, switched by weight, never fused.

Switching is ``set_adapters`` on modules that stay in memory, so changing LoRA (or its
weight) costs no reload of the base model. Adapters are never fused into the base weights:
disabling them gives back the base output bit for bit (fuse/unfuse would leave ~1e-6
rounding behind).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import JobFailure
from shared.specs import LoraRef

if TYPE_CHECKING:
    import torch

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

    def cached(self) -> set[str]:
        """The hashes of the files on disk."""
        if not self.root.is_dir():
            return set()
        return {path.name.removesuffix(".safetensors") for path in self.root.glob("*.safetensors")}

    def remove(self, sha256: str) -> bool:
        """Whether there was a copy to remove (a worker that never used the LoRA has none)."""
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        return True


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
        # the manifest names the file's hash and, for a subject's LoRA, the subject
        return [{"id": lora.id, "name": lora.name, "sha256": lora.sha256, "weight": lora.weight,
                 "adapter": name, **({"subject_id": lora.subject_id} if lora.subject_id else {})}
                for lora, name in zip(loras, names, strict=True)]

    def held(self) -> set[str]:
        """The hashes of every adapter loaded into any pipeline."""
        return {sha for held in self._loaded.values() for sha in held.values()}

    def unload(self, pipe: Any, sha256s: set[str]) -> list[str]:
        """Drop the adapters of these files from ``pipe``; returns the adapter names dropped.

        Called with the model's lock held. The rest stay loaded but disabled: peft makes the
        remaining adapters active when one is deleted, and the next job that wants them
        enables exactly its own set.
        """
        held = self._loaded.get(pipe)
        if not held:
            return []
        names = [name for name, sha256 in held.items() if sha256 in sha256s]
        for name in names:
            pipe.delete_adapters(name)
            del held[name]
            logger.info("unloaded LoRA adapter %s of a deleted LoRA", name)
        if names:
            if held:
                pipe.disable_lora()
            self._active[pipe] = ()
        return names

    def _load(self, pipe: Any, lora: LoraRef, name: str) -> None:
        from safetensors.torch import load_file

        path = self.files.path(lora.sha256)
        try:
            state = load_file(str(path))
            pipe.load_lora_weights(convert_kohya_lora(state, pipe), adapter_name=name)
        except Exception as exc:  # diffusers/peft raise many types for a file that does not fit
            try:
                pipe.delete_adapters(name)
            except Exception:  # noqa: BLE001 - it may not have been registered at all
                logger.debug("no partial adapter %s to remove", name)
            raise LoraLoadFailed(f"LoRA {lora.name!r} could not be applied to this model: "
                                 f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        self.loads += 1
        logger.info("loaded LoRA %s as adapter %s", lora.name, name)


# --------------------------------------------------------------------------- kohya naming

# sd-scripts' module names: the model's module path with every "." written as "_".
_KOHYA_SD_KEY = re.compile(r"^lora_(?P<prefix>unet|te|te1|te2)_(?P<module>[^.]+)\.(?P<role>.+)$")
_KOHYA_SD_COMPONENTS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder",
                        "te2": "text_encoder_2"}
# kohya trains SDXL on the original (sgm) UNet; these layers sit outside its block structure or
# are named differently inside resnets. Block indices are remapped by diffusers' own helper.
_SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
_SGM_RENAMES = (
    ("input_blocks_0_0", "conv_in"), ("time_embed_0", "time_embedding_linear_1"),
    ("time_embed_2", "time_embedding_linear_2"), ("label_emb_0_0", "add_embedding_linear_1"),
    ("label_emb_0_2", "add_embedding_linear_2"), ("out_2", "conv_out"),
)
_SGM_BLOCK_RENAMES = (("input_blocks_", "down_blocks_"), ("middle_block_", "mid_block_"),
                      ("output_blocks_", "up_blocks_"))
_SGM_RESNET_RENAMES = (("in_layers_2", "conv1"), ("out_layers_3", "conv2"),
                       ("emb_layers_1", "time_emb_proj"), ("skip_connection", "conv_shortcut"))


@dataclass
class _KohyaModule:
    component: str
    flat: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def convert_kohya_lora(state: dict[str, torch.Tensor], pipe: Any) -> dict[str, torch.Tensor]:
    """Rename a kohya (sd-scripts) SD1.5/SDXL LoRA to names diffusers loads without guessing
    (peft's for the UNet, diffusers' ``lora_linear_layer`` for text encoders), against
    ``pipe``'s own modules.

    diffusers' own kohya conversion writes its older naming and then has to guess which naming
    that was from the keys present; it guesses only when an attention output (``to_out`` or
    ``out_proj``) or a text-encoder MLP is adapted, so a LoRA of, say, the text encoder's
    ``q_proj`` alone fails every load with "Could not automatically infer state dict type". A
    kohya name is the module's path with dots written as underscores, so looking each one up
    among the model's own modules recovers it exactly, whichever modules a file adapts. Each
    module's ``alpha`` is folded into its up weight (kohya scales by alpha/rank; peft's
    default scale is 1), which also keeps different alphas per module exact.

    Anything else (peft/diffusers files, Flux) passes through to diffusers unchanged; the
    gateway's upload check (``services/gateway/loras/inspection.py``) refuses kohya SD files
    with tensors this cannot place.
    """
    if not state or getattr(pipe, "unet", None) is None:
        return state
    modules: dict[str, _KohyaModule] = {}
    dora_scales = 0
    for key, tensor in state.items():
        match = _KOHYA_SD_KEY.match(key)
        if match is None or match["role"] not in ("lora_down.weight", "lora_up.weight", "alpha",
                                                  "dora_scale"):
            return state
        if match["role"] == "dora_scale":
            dora_scales += 1
            continue
        name = f"lora_{match['prefix']}_{match['module']}"
        module = modules.setdefault(name, _KohyaModule(_KOHYA_SD_COMPONENTS[match["prefix"]],
                                                       match["module"]))
        module.tensors[match["role"]] = tensor
    if dora_scales:
        # What diffusers' SD loader does with them too: the file applies as the plain LoRA
        # it also is (peft's DoRA magnitude is not kohya's dora_scale).
        logger.warning("ignoring %d DoRA scales of a kohya LoRA", dora_scales)
    paths = _sgm_to_diffusers([name for name, module in modules.items()
                               if module.component == "unet"], pipe.unet.config)
    converted: dict[str, torch.Tensor] = {}
    lookups: dict[str, dict[str, tuple[str, Any]]] = {}
    for name, module in modules.items():
        if "lora_down.weight" not in module.tensors:  # a stray alpha; the upload check saw to pairs
            continue
        model = getattr(pipe, module.component, None)
        if model is None:
            raise ValueError(f"{name!r} adapts {module.component}, which this model does not have")
        if module.component not in lookups:
            lookups[module.component] = _flat_module_names(model)
        flat = paths.get(name, module.flat)
        found = lookups[module.component].get(flat)
        if found is None:
            raise ValueError(f"{name!r} names no layer of this model's {module.component} "
                             "(a LoRA for another model or another layout)")
        path, layer = found
        down, up = _fit(module.tensors["lora_down.weight"], layer, "down"), _fit(
            module.tensors["lora_up.weight"], layer, "up")
        rank = down.shape[0]
        alpha = module.tensors.get("alpha")
        if alpha is not None and float(alpha) != rank:
            up = (up.float() * (float(alpha) / rank)).to(up.dtype)
        # diffusers re-guesses a text encoder's naming too, and from peft's names it finds one
        # only when q/k/v/out_proj are adapted (an MLP-only LoRA fails): its own naming for
        # text encoders is recognised whichever layers are there.
        down_key, up_key = (("lora_A.weight", "lora_B.weight") if module.component == "unet"
                            else ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"))
        converted[f"{module.component}.{path}.{down_key}"] = down
        converted[f"{module.component}.{path}.{up_key}"] = up
    return converted


def _flat_module_names(model: Any) -> dict[str, tuple[str, Any]]:
    """Each adaptable layer under its kohya spelling. CLIP layers answer to both nestings
    (``text_model.encoder…`` as sd-scripts writes them, ``encoder…`` as transformers 5 has
    them), so files from either side of that change load."""
    import torch

    names: dict[str, tuple[str, Any]] = {}
    for path, layer in model.named_modules():
        if not isinstance(layer, torch.nn.Linear | torch.nn.Conv2d) or ".lora_" in path:
            continue
        # A layer that already holds an adapter is peft's wrapper around it: name the wrapper.
        path = path.removesuffix(".base_layer")
        flat = path.replace(".", "_")
        names[flat] = (path, layer)
        if flat.startswith("text_model_"):
            names.setdefault(flat.removeprefix("text_model_"), (path, layer))
        else:
            names.setdefault(f"text_model_{flat}", (path, layer))
    return names


def _sgm_to_diffusers(names: list[str], unet_config: Any) -> dict[str, str]:
    """kohya module names of an SDXL LoRA (sgm layout) to the diffusers UNet's, flat."""
    if not any(block in name for name in names for block in _SGM_BLOCKS):
        return {}
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    renamed: dict[str, str] = {}
    for name in names:
        flat = name.removeprefix("lora_unet_")
        for old, new in _SGM_RENAMES:
            if flat == old:
                flat = new
        renamed[f"lora_unet_{flat}"] = name
    # The helper moves keys between dicts; feed it the names as keys and read back the values.
    mapped: dict[str, str] = _maybe_map_sgm_blocks_to_diffusers(  # type: ignore[no-untyped-call]
        dict(zip(renamed, renamed, strict=True)), unet_config)
    paths: dict[str, str] = {}
    for new_key, old_key in mapped.items():
        flat = new_key.removeprefix("lora_unet_")
        for old, new in _SGM_BLOCK_RENAMES:
            if flat.startswith(old):
                flat = new + flat.removeprefix(old)
        for old, new in _SGM_RESNET_RENAMES:
            flat = flat.replace(f"_{old}", f"_{new}")
        if "samplers_" in flat:
            flat = flat.replace("_op", "_conv")
        paths[renamed[old_key]] = flat
    return paths


def _fit(tensor: torch.Tensor, layer: Any, role: str) -> torch.Tensor:
    """kohya writes 1x1 convolutions as 4-D and may meet a Linear (SDXL's ``proj_in``) or the
    reverse; peft wants the layer's own rank of tensor."""
    import torch

    if isinstance(layer, torch.nn.Linear) and tensor.dim() == 4 and tensor.shape[2:] == (1, 1):
        return tensor.flatten(1)
    if isinstance(layer, torch.nn.Conv2d) and tensor.dim() == 2:
        if role == "up" or layer.kernel_size == (1, 1):
            return tensor[:, :, None, None]
    return tensor

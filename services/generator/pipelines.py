"""Loading diffusers pipelines once per process and keeping them warm.

Every source ends up as ``from_pretrained(<directory>)`` once ``services.models.sources`` has
made local files of it, as for every worker: built-in tiny models are built into the model
cache first, hub ids are resolved to a snapshot directory (downloaded only when settings
allow), and local directories are used as they are. A single-file checkpoint is read by
``from_single_file`` with local configs instead (``singlefile.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import inspect
import logging
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.generator.singlefile import load_single_file
from services.models.device import pick_device
from services.models.sources import ModelSources
from services.models.weights import listed_components, model_index
from shared.errors import ModelUnavailable
from shared.models import SCHEDULERS, ModelPreset, ModelRegistry

logger = logging.getLogger(__name__)


def pick_dtype(preset_dtype: str, device: str) -> torch.dtype:
    """Half precision only where the device does it well; CPUs get float32 (half-precision
    matmuls there are slow or missing), which :func:`dtype_note` reports to the user."""
    if device == "cpu":
        return torch.float32
    if preset_dtype == "auto":
        return torch.float16
    return {"float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[preset_dtype]


def dtype_note(preset_dtype: str, dtype: torch.dtype) -> str | None:
    """Why the model runs in another precision than its preset asks for, if it does."""
    ran = str(dtype).removeprefix("torch.")
    if preset_dtype in ("auto", ran):
        return None
    return (f"the preset asks for {preset_dtype}; this worker's device runs it as {ran} "
            "(half precision is used on GPUs only)")


def without_safety_checker(index: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` keywords that leave diffusers' safety checker out of a pipeline
    whose ``model_index.json`` lists it; derived pipelines (``from_pipe``) inherit that."""
    listed = listed_components(index)
    if "safety_checker" not in listed:
        return {}
    kwargs: dict[str, Any] = {"safety_checker": None}
    if "feature_extractor" in listed and "image_encoder" not in listed:  # IP-Adapter uses it
        kwargs["feature_extractor"] = None
    import diffusers

    pipeline_cls = getattr(diffusers, str(index.get("_class_name")), None)
    if pipeline_cls is not None and "requires_safety_checker" in inspect.signature(
            pipeline_cls.__init__).parameters:
        kwargs["requires_safety_checker"] = False  # no "you disabled the checker" warning
    return kwargs


def check_components(path: Path, index: dict[str, Any], *, model: str) -> None:
    """Refuse a repository that lists a component it lacks, naming it: diffusers' own error
    is ``no file named model.safetensors ... in directory`` without the component."""
    skipped = without_safety_checker(index)
    for name in listed_components(index):
        folder = path / name
        if name not in skipped and (not folder.is_dir() or not any(folder.iterdir())):
            raise ModelUnavailable(f"component `{name}` of model {model!r}: {folder} is "
                                   "missing or empty")


def _failed_component(path: Path, index: dict[str, Any], exc: Exception, *, model: str) -> str:
    """Which component a load error is about, when its message names the folder."""
    message = str(exc)
    for name in listed_components(index):
        if str(path / name) in message:
            weights = "no weights" if "no file named" in message else "cannot load it"
            return f"component `{name}` of model {model!r}: {weights} in {path / name}"
    return f"cannot load {model!r} from {path}"


def release_memory(device: str) -> None:
    """Hand freed weights back: collect the cycles diffusers' modules and hooks form, empty
    the CUDA cache, and ask glibc to return freed arenas, which it otherwise keeps (an
    evicted SD1.5 stayed in RSS until the next switch)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        libc_name = ctypes.util.find_library("c")
        if libc_name:
            try:
                ctypes.CDLL(libc_name).malloc_trim(0)
            except (OSError, AttributeError):  # musl has no malloc_trim
                logger.debug("malloc_trim unavailable")


@dataclass
class LoadedModel:
    """A base pipeline plus everything derived from it without loading the base again.

    img2img, inpainting and ControlNet pipelines are made with ``from_pipe`` and share the
    base's modules (UNet/transformer, VAE, text encoders), so switching mode costs a few
    milliseconds and no memory; only companion weights (ControlNets, an inpainting UNet) are
    loaded, once each.
    """

    preset: ModelPreset
    pipe: Any
    path: Path
    revision: str | None
    sha256: str
    device: str
    dtype: str
    load_s: float
    default_scheduler: Any
    dtype_note: str | None = None  # why ``dtype`` differs from what the preset asked for
    resolver: Any = None  # Callable[[str], Path]: a companion source to a local directory
    lock: threading.Lock = field(default_factory=threading.Lock)
    derived: dict[tuple[str, tuple[str, ...]], Any] = field(default_factory=dict)
    companions: dict[str, Any] = field(default_factory=dict)
    derived_loads: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.preset.name, "family": self.preset.family.value,
            "source": self.preset.source, "revision": self.revision, "sha256": self.sha256,
            "short_hash": self.sha256[:10], "pipeline": type(self.pipe).__name__,
            "dtype": self.dtype, "requested_dtype": self.preset.dtype,
            **({"dtype_note": self.dtype_note} if self.dtype_note else {}),
            "options": {"attention_slicing": self.preset.attention_slicing,
                        "vae_slicing": self.preset.vae_slicing,
                        "vae_tiling": self.preset.vae_tiling,
                        "cpu_offload": self.preset.cpu_offload,
                        "dtype": self.dtype},
        }

    def release(self) -> None:
        """Drop every pipeline, companion and adapter this model holds, so that its memory
        can go even while something still refers to this object."""
        self.derived.clear()
        self.companions.clear()
        if hasattr(self.pipe, "unload_lora_weights"):  # derived pipelines share its modules
            try:
                self.pipe.unload_lora_weights()
            except Exception:  # noqa: BLE001 - freeing memory must not fail an eviction
                logger.debug("no LoRA weights to unload from %s", self.preset.name)
        self.pipe = None
        self.default_scheduler = None

    def use_scheduler(self, name: str | None, pipe: Any | None = None) -> str:
        """Swap the scheduler of ``pipe`` (default: the base) in place; ``None`` restores the
        model's own. Schedulers hold per-run state, so each call gets a fresh one."""
        target = self.pipe if pipe is None else pipe
        if name is None:
            target.scheduler = type(self.default_scheduler).from_config(
                self.default_scheduler.config)
            own = type(self.default_scheduler).__name__
            return next((known for known, (cls, extra) in SCHEDULERS.items()
                         if cls == own and not extra), own)
        import diffusers

        class_name, extra = SCHEDULERS[name]
        scheduler_cls = getattr(diffusers, class_name)
        target.scheduler = scheduler_cls.from_config(self.default_scheduler.config, **extra)
        return name

    def weight_bytes(self) -> int:
        """The base's and companions' weights; derived pipelines add nothing."""
        return module_bytes(self.pipe, *self.companions.values())

    def _companion(self, key: str, source: str, loader: Any) -> Any:
        if key not in self.companions:
            path = self.resolver(source)
            dtype = getattr(torch, self.dtype)
            try:
                model = loader(path, dtype)
            except (OSError, ValueError) as exc:
                raise ModelUnavailable(f"cannot load {key} for {self.preset.name!r} from "
                                       f"{path}: {exc}") from exc
            self.companions[key] = model.to(self.device)
            self.derived_loads += 1
        return self.companions[key]

    def controlnet(self, kind: str) -> Any:
        source = self.preset.controlnets.get(kind)  # type: ignore[call-overload]
        if source is None:
            raise ModelUnavailable(f"{self.preset.name} has no {kind} ControlNet")
        import diffusers

        class_name = "FluxControlNetModel" if self.preset.family == "flux" else "ControlNetModel"
        ControlNetClass = getattr(diffusers, class_name)  # noqa: N806
        return self._companion(f"controlnet-{kind}", source,
                               lambda path, dtype: ControlNetClass.from_pretrained(
                                   path, torch_dtype=dtype))

    def inpaint_unet(self) -> Any | None:
        """The dedicated inpainting UNet when the preset has one; the pipeline (text encoders,
        VAE) stays the base's, which is what inpainting checkpoints are fine-tuned from."""
        source = self.preset.inpaint_source
        if source is None or self.preset.family == "flux":
            return None
        from diffusers import UNet2DConditionModel

        return self._companion("inpaint-unet", source,
                               lambda path, dtype: UNet2DConditionModel.from_pretrained(
                                   path, subfolder="unet", torch_dtype=dtype))

    def pipeline_for(self, mode: str, controls: tuple[str, ...] = (), *,
                     dedicated_inpaint: bool = True) -> Any:
        """The pipeline for a mode and a list of control types, derived once and reused."""
        dedicated = dedicated_inpaint and mode == "inpaint" and self.preset.inpaint_source is not None
        key = (mode + ("+unet" if dedicated else ""), controls)
        if key in self.derived:
            return self.derived[key]
        from diffusers import (
            AutoPipelineForImage2Image,
            AutoPipelineForInpainting,
            AutoPipelineForText2Image,
        )

        extra: dict[str, Any] = {}
        if controls:
            nets = [self.controlnet(kind) for kind in controls]
            if self.preset.family == "flux":
                from diffusers import FluxMultiControlNetModel

                extra["controlnet"] = FluxMultiControlNetModel(nets) if len(nets) > 1 else nets[0]
            else:
                extra["controlnet"] = nets if len(nets) > 1 else nets[0]
        if mode == "txt2img":
            pipe = (AutoPipelineForText2Image.from_pipe(self.pipe, **extra) if controls
                    else self.pipe)
        elif mode == "img2img":
            pipe = AutoPipelineForImage2Image.from_pipe(self.pipe, **extra)
        else:
            unet = self.inpaint_unet() if dedicated else None
            if unet is not None:
                extra["unet"] = unet
            pipe = AutoPipelineForInpainting.from_pipe(self.pipe, **extra)
        if pipe is not self.pipe:
            pipe.set_progress_bar_config(disable=True)
        self.derived[key] = pipe
        return pipe


def module_bytes(*holders: Any) -> int:
    """Bytes of the distinct tensors (parameters and buffers) the holders' modules keep.

    Derived pipelines share their base's modules, so tensors are counted once by storage.
    """
    seen: set[int] = set()
    total = 0
    for holder in holders:
        modules = (holder.components.values() if hasattr(holder, "components") else [holder])
        for module in modules:
            if not isinstance(module, torch.nn.Module):
                continue
            for tensor in [*module.parameters(), *module.buffers()]:
                pointer = tensor.untyped_storage().data_ptr()
                if pointer not in seen:
                    seen.add(pointer)
                    total += tensor.untyped_storage().nbytes()
    return total


class PipelineCache:
    """Least-recently-used set of loaded pipelines, bounded by count and by weight bytes.

    The byte budget is what matters on a GPU: an SDXL base with two ControlNets weighs three
    times an SD1.5, so a count alone either wastes memory or runs out of it. The model a job
    asks for is always kept, even when it alone exceeds the budget.
    """

    def __init__(
        self, *, registry: ModelRegistry, cache_dir: Path, device: str = "auto",
        allow_downloads: bool = False, max_loaded: int = 1, max_bytes: int = 0,
    ) -> None:
        self.registry = registry
        self.cache_dir = cache_dir
        self.device = pick_device(device)
        self.sources = ModelSources(cache_dir=cache_dir, allow_downloads=allow_downloads)
        self.max_loaded = max(1, max_loaded)
        self.max_bytes = max_bytes  # 0: no byte budget
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, name: str) -> LoadedModel:
        with self._lock:
            if name in self._loaded:
                self.hits += 1
                self._loaded.move_to_end(name)
                return self._loaded[name]
            self.misses += 1
            preset = self.registry.get(name)
            if preset is None:
                raise ModelUnavailable(f"model {name!r} is not in this worker's registry")
            while len(self._loaded) >= self.max_loaded:
                self._evict_oldest()
            loaded = self._load(preset)
            self._loaded[name] = loaded
            while self.max_bytes and len(self._loaded) > 1 and self.loaded_bytes() > self.max_bytes:
                self._evict_oldest()
            return loaded

    def loaded_bytes(self) -> int:
        return sum(model.weight_bytes() for model in self._loaded.values())

    def loaded_names(self) -> list[str]:
        return list(self._loaded)

    def loaded_models(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._loaded.values())

    def _evict_oldest(self) -> None:
        evicted, loaded = self._loaded.popitem(last=False)
        logger.info("evicting model %s", evicted)
        loaded.release()
        del loaded
        release_memory(self.device)

    def resolve_source(self, source: str) -> Path:
        """A companion's source (ControlNet, inpainting UNet) to a local directory."""
        return self.sources.path(source)

    def _resolve(self, preset: ModelPreset) -> tuple[Path, str | None]:
        return self.sources.resolve(preset.source, name=preset.name, revision=preset.revision)

    def _load(self, preset: ModelPreset) -> LoadedModel:
        from diffusers import DiffusionPipeline

        started = time.perf_counter()
        path, revision = self._resolve(preset)
        dtype = pick_dtype(preset.dtype, self.device)
        index = model_index(path)
        check_components(path, index, model=preset.name)
        if path.is_file():
            pipe = load_single_file(preset, path, dtype=dtype, model_cache=self.cache_dir)
        else:
            try:
                pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype,
                                                         **without_safety_checker(index))
            except (OSError, ValueError) as exc:
                raise ModelUnavailable(
                    f"{_failed_component(path, index, exc, model=preset.name)}: {exc}") from exc
        if preset.cpu_offload and self.device.startswith("cuda"):
            pipe.enable_model_cpu_offload()
        else:
            pipe.to(self.device)
        if preset.attention_slicing:
            pipe.enable_attention_slicing()
        if preset.vae_slicing and hasattr(pipe, "vae"):
            pipe.vae.enable_slicing()
        if preset.vae_tiling and hasattr(pipe, "vae"):
            pipe.vae.enable_tiling()
        pipe.set_progress_bar_config(disable=True)
        loaded_components = [name for name, module in pipe.components.items()
                             if module is not None]
        sha = self.sources.weights_hash(path, loaded_components)
        elapsed = time.perf_counter() - started
        logger.info("loaded model %s in %.2fs", preset.name, elapsed, extra={"model": preset.name})
        return LoadedModel(
            preset=preset, pipe=pipe, path=path, revision=revision, sha256=sha,
            device=self.device, dtype=str(dtype).removeprefix("torch."), load_s=elapsed,
            default_scheduler=pipe.scheduler, resolver=self.resolve_source,
            dtype_note=dtype_note(preset.dtype, dtype),
        )

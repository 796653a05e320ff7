"""Loading diffusers pipelines once per process and keeping them warm.

Every source ends up as ``from_pretrained(<directory>)``: built-in tiny models are built into
the model cache first, hub ids are resolved to a snapshot directory (downloaded only when
settings allow), and local directories are used as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.generator.tiny import ensure_tiny_model
from shared.errors import ModelUnavailable
from shared.models import SCHEDULERS, ModelPreset, ModelRegistry

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".gguf")


def pick_device(wanted: str) -> str:
    if wanted != "auto":
        return wanted
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(preset_dtype: str, device: str) -> torch.dtype:
    """Half precision only where the device does it well; CPUs get float32."""
    if device == "cpu":
        return torch.float32
    if preset_dtype == "auto":
        return torch.float16
    return {"float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[preset_dtype]


def weights_hash(folder: Path, sidecar_dir: Path) -> str:
    """SHA-256 over the weight files, cached by (name, size, mtime): real models are GBs."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    fingerprint = [[p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
                   for p in files]
    sidecar = sidecar_dir / (hashlib.sha1(str(folder.resolve()).encode()).hexdigest() + ".json")
    if sidecar.exists():
        cached = json.loads(sidecar.read_text())
        if cached.get("fingerprint") == fingerprint:
            return str(cached["sha256"])
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode())
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    sidecar_dir.mkdir(parents=True, exist_ok=True)
    sidecar.write_text(json.dumps({"fingerprint": fingerprint, "sha256": digest.hexdigest()}))
    return digest.hexdigest()


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
            "dtype": self.dtype,
            "options": {"attention_slicing": self.preset.attention_slicing,
                        "vae_slicing": self.preset.vae_slicing,
                        "vae_tiling": self.preset.vae_tiling,
                        "cpu_offload": self.preset.cpu_offload,
                        "dtype": self.dtype},
        }

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
        self.allow_downloads = allow_downloads
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

    def _evict_oldest(self) -> None:
        evicted, _ = self._loaded.popitem(last=False)
        logger.info("evicting model %s", evicted)
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def resolve_source(self, source: str) -> Path:
        """A companion's source (ControlNet, inpainting UNet) to a local directory."""
        return self._resolve_source(source, name=source, revision=None)[0]

    def _resolve(self, preset: ModelPreset) -> tuple[Path, str | None]:
        return self._resolve_source(preset.source, name=preset.name, revision=preset.revision)

    def _resolve_source(self, source: str, *, name: str,
                        revision: str | None) -> tuple[Path, str | None]:
        if source.startswith("builtin:"):
            return ensure_tiny_model(source.removeprefix("builtin:"), self.cache_dir), None
        if Path(source).is_dir():
            return Path(source), None
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            path = Path(snapshot_download(
                source, revision=revision, cache_dir=self.cache_dir / "hub",
                local_files_only=not self.allow_downloads,
            ))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
            hint = "" if self.allow_downloads else (
                " (downloads are off: put the weights in the model cache or set "
                "LOOMIS_GENERATOR__ALLOW_DOWNLOADS=true)")
            raise ModelUnavailable(f"weights for {name!r} ({source}) are not available"
                                   f"{hint}") from exc
        return path, path.name

    def _load(self, preset: ModelPreset) -> LoadedModel:
        from diffusers import DiffusionPipeline

        started = time.perf_counter()
        path, revision = self._resolve(preset)
        dtype = pick_dtype(preset.dtype, self.device)
        try:
            pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"cannot load {preset.name!r} from {path}: {exc}") from exc
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
        sha = weights_hash(path, self.cache_dir / ".hashes")
        elapsed = time.perf_counter() - started
        logger.info("loaded model %s in %.2fs", preset.name, elapsed, extra={"model": preset.name})
        return LoadedModel(
            preset=preset, pipe=pipe, path=path, revision=revision, sha256=sha,
            device=self.device, dtype=str(dtype).removeprefix("torch."), load_s=elapsed,
            default_scheduler=pipe.scheduler, resolver=self.resolve_source,
        )

"""A LoRA trainer for SD1.5-family diffusers models, with kohya sd-scripts' options and output.

peft injects the adapters into the very UNet (and, optionally, text encoder) the pipeline
samples with, so sample images during training use the current weights at no extra cost.
The file written at the end is kohya-format safetensors (``lora_unet_…``/``lora_te_…`` keys,
``.alpha`` tensors, ``ss_*`` metadata), which diffusers, A1111 and ComfyUI all load.

Everything random in a run flows from ``seed`` through generators the trainer owns (data
order per epoch, augmentation, latent sampling, noise, timesteps) or torch's global generator
(adapter init, dropout), and all of them are saved in a state: a resumed run repeats the
uninterrupted one exactly, on CPU bit for bit.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shared.models import SCHEDULERS
from shared.training import SubsetOptions  # the same model the gateway validates

logger = logging.getLogger(__name__)

OptimizerName = Literal["AdamW", "AdamW8bit", "Lion", "Lion8bit", "SGDNesterov", "Prodigy", "Adafactor"]
SchedulerName = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                        "polynomial"]
Precision = Literal["no", "fp16", "bf16"]
SavePrecision = Literal["float", "fp16", "bf16"]

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# Where each optimizer lives: (module, attribute, pip package that provides it).
_OPTIMIZERS: dict[str, tuple[str, str, str]] = {
    "AdamW": ("torch.optim", "AdamW", "torch"),
    "SGDNesterov": ("torch.optim", "SGD", "torch"),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "Lion8bit": ("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "Adafactor": ("transformers.optimization", "Adafactor", "transformers"),
}
_STATE_FILES = ("adapter.safetensors", "optimizer.pt", "lr_scheduler.pt", "rng.pt", "trainer.json")
_ADAPTER = "default"


class OptimizerUnavailable(RuntimeError):
    """The optimizer asked for needs a package this worker does not have."""


class TrainingRefused(ValueError):
    """A configuration, device or saved state this trainer cannot train with: the caller's to
    change, not a fault of the trainer (the worker reports it as such, not as a crash)."""


@dataclass(frozen=True)
class SamplePrompt:
    """One preview image rendered during training (kohya's ``--sample_prompts`` line)."""

    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int = 0
    scale: float = 7.0
    steps: int = 20
    # a shared.models.SCHEDULERS name (kohya's sampler, mapped); None keeps the model's own
    scheduler: str | None = None


@dataclass
class TrainExample:
    """An image and its caption; ``bucket`` is its (width, height) training size.

    ``dataset_dir`` names the subset in the metadata (kohya's ``<repeats>_<name>`` folder);
    left empty it is derived from ``repeats`` and ``is_reg``.
    """

    image: Image.Image
    caption: str
    repeats: int = 1
    is_reg: bool = False
    bucket: tuple[int, int] | None = None
    dataset_dir: str = ""
    # kohya's per-[[datasets]] batching (None: the TrainConfig's) and per-subset caption and
    # augmentation options (None: the TrainConfig's); batches never mix datasets
    dataset: int = 0
    batch_size: int | None = None
    resolution: tuple[int, int] | None = None
    options: SubsetOptions | None = None

    def subset(self) -> str:
        return self.dataset_dir or f"{self.repeats}_{'reg' if self.is_reg else 'img'}"


@dataclass
class TrainConfig:
    """kohya sd-scripts ``train_network.py`` options; defaults follow its documented ones."""

    rank: int = 4  # network_dim
    alpha: float = 1.0  # network_alpha
    dropout: float = 0.0  # network_dropout (peft applies it to the adapter input)
    target_modules: tuple[str, ...] = UNET_TARGETS
    train_text_encoder: bool = False
    text_encoder_target_modules: tuple[str, ...] = TEXT_ENCODER_TARGETS
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    lr_scheduler: SchedulerName = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    optimizer: OptimizerName = "AdamW"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    max_train_steps: int = 1600
    max_train_epochs: int | None = None  # wins over max_train_steps
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: Precision = "no"
    gradient_checkpointing: bool = False
    seed: int | None = None
    resolution: int = 512
    noise_offset: float | None = None
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    min_snr_gamma: float | None = None
    clip_skip: int | None = None
    v_parameterization: bool = False
    prior_loss_weight: float = 1.0
    cache_latents: bool = False
    latents_cache_dir: Path | None = None
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    max_token_length: int = 75  # 150 and 225: kohya's 75-token chunks, concatenated
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    sample_prompts: list[SamplePrompt] = field(default_factory=list)
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    save_every_n_steps: int | None = None
    save_every_n_epochs: int | None = None
    save_state: bool = False
    save_state_on_stop: bool = False  # write a state when should_stop() ends the run
    save_precision: SavePrecision = "float"
    output_name: str = "lora"
    base_model_hash: str = ""
    base_model_name: str = ""
    training_comment: str = ""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise TrainingRefused(f"rank (network_dim) must be at least 1, not {self.rank}")
        if self.cache_latents and (self.flip_aug or self.color_aug or self.random_crop):
            # As sd-scripts documents: a cached latent is of one fixed image, augmentations
            # would never reach it.
            raise TrainingRefused("cache_latents cannot be combined with flip_aug, color_aug or "
                                  "random_crop: cached latents are encoded once, so augmentations "
                                  "would never apply")
        if self.max_token_length not in (75, 150, 225):
            raise TrainingRefused(f"max_token_length must be 75, 150 or 225, not {self.max_token_length}")
        if self.optimizer not in _OPTIMIZERS:
            raise TrainingRefused(f"unknown optimizer {self.optimizer!r}; known: {', '.join(_OPTIMIZERS)}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise TrainingRefused(f"mixed_precision must be no, fp16 or bf16, not {self.mixed_precision!r}")
        if self.save_precision not in ("float", "fp16", "bf16"):
            raise TrainingRefused(f"save_precision must be float, fp16 or bf16, not {self.save_precision!r}")
        for name in ("batch_size", "gradient_accumulation_steps", "max_train_steps"):
            if getattr(self, name) < 1:
                raise TrainingRefused(f"{name} must be at least 1")
        if self.max_train_epochs is not None and self.max_train_epochs < 1:
            raise TrainingRefused("max_train_epochs must be at least 1")
        if self.resolution % 8:
            raise TrainingRefused(f"resolution must be a multiple of 8, not {self.resolution}")
        if not 0.0 <= self.caption_dropout_rate <= 1.0:
            raise TrainingRefused("caption_dropout_rate must be between 0 and 1")
        if self.clip_skip is not None and self.clip_skip < 1:
            raise TrainingRefused("clip_skip counts from 1 (the last layer)")


@dataclass
class TrainResult:
    lora_bytes: bytes
    steps: int
    epochs: int
    final_loss: float  # the running average at the last step, as kohya's avr_loss
    state_dir: Path | None
    stopped: bool = False
    losses: list[float] = field(default_factory=list)  # per optimizer step, of this run only


StepCallback = Callable[[int, int, int, float, float, float, float], None]
SampleCallback = Callable[[int, int, Image.Image], None]
CheckpointCallback = Callable[[int, bytes, Path | None], None]


@dataclass
class _Item:
    """One image in the epoch's list; an example with ``repeats`` = 3 gives three."""

    example: int
    bucket: tuple[int, int]
    is_reg: bool
    dataset: int = 0


@dataclass
class _Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch being trained, from 0
    batch: int = 0  # batches of that epoch already used
    started_at: float = field(default_factory=time.time)


def _cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover ``size`` keeping the aspect ratio; what sticks out is cropped per use."""
    image = image.convert("RGB")
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    return image.resize(resized, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)


def _crop(image: Image.Image, size: tuple[int, int], generator: torch.Generator | None = None) -> Image.Image:
    """The ``size`` window of a covering image: centred, as sd-scripts trims without
    ``random_crop``, or at an offset drawn from ``generator`` (kohya's ``random_crop``)."""
    spare_x, spare_y = image.width - size[0], image.height - size[1]
    if generator is None:
        left, top = spare_x // 2, spare_y // 2
    else:
        left = int(torch.randint(0, spare_x + 1, (), generator=generator))
        top = int(torch.randint(0, spare_y + 1, (), generator=generator))
    return image.crop((left, top, left + size[0], top + size[1]))


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover ``size`` and centre-crop, as sd-scripts does without random_crop."""
    return _crop(_cover(image, size), size)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _image_hash(image: Image.Image, size: tuple[int, int]) -> str:
    digest = hashlib.sha256(f"{image.mode}:{image.size}:{size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())


def _kohya_module(prefix: str, module: str) -> str:
    if prefix == "lora_te" and not module.startswith("text_model."):
        # sd-scripts names CLIP layers from transformers 4's nesting (text_model.encoder…).
        module = f"text_model.{module}"
    return f"{prefix}_{module.replace('.', '_')}"


def _seed_from(*parts: int) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def optimizer_available(name: str) -> None:
    """Raise ``OptimizerUnavailable`` unless ``name``'s package imports here."""
    module, attribute, package = _OPTIMIZERS[name]
    try:
        getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, RuntimeError) as exc:  # bitsandbytes raises RuntimeError
        raise OptimizerUnavailable(
            f"optimizer {name} needs the {package!r} package, which is not installed on this worker "
            f"({type(exc).__name__}: {exc}); choose AdamW, SGDNesterov or Adafactor, or install "
            f"{package}") from exc


class LoraTrainer:
    """Trains one LoRA on ``model_dir`` (a diffusers SD1.5-family folder)."""

    def __init__(self, *, model_dir: Path, cfg: TrainConfig, device: str = "cpu") -> None:
        self.model_dir = Path(model_dir)
        self.cfg = cfg
        self.device = torch.device(device)
        if cfg.mixed_precision == "fp16" and self.device.type != "cuda":
            raise TrainingRefused("mixed_precision='fp16' needs a CUDA device; use 'bf16' or 'no' on "
                             f"{self.device.type}")
        optimizer_available(cfg.optimizer)
        self.seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31)
        self._autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
        self._pipe: Any = None
        self._latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._vae_hash: str | None = None

    # ------------------------------------------------------------------ model

    def _load(self) -> None:
        from diffusers import DDPMScheduler, StableDiffusionPipeline
        from peft import LoraConfig as _LoraConfig
        from peft import NoMatchingPeftModuleError

        # peft annotates lora_alpha as int; kohya's alpha may be fractional and peft divides it.
        LoraConfig: Any = _LoraConfig  # noqa: N806
        cfg = self.cfg
        pipeline_class: Any = StableDiffusionPipeline
        pipe = pipeline_class.from_pretrained(
            self.model_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        prediction = "v_prediction" if cfg.v_parameterization else pipe.scheduler.config.prediction_type
        if prediction != pipe.scheduler.config.prediction_type:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config,
                                                              prediction_type=prediction)
        # Training noise follows the model's own beta schedule, as DDPM defines it.
        ddpm: Any = DDPMScheduler
        self.noise_scheduler = ddpm.from_config(
            pipe.scheduler.config, prediction_type=prediction, clip_sample=False)
        self.prediction_type: str = prediction
        alphas = self.noise_scheduler.alphas_cumprod.float()
        self.all_snr: torch.Tensor = alphas / (1.0 - alphas)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        if self.device.type == "cuda" and self._autocast_dtype is not None:
            # Frozen base weights in the compute dtype; the VAE stays float32 (SD1.5's VAE
            # overflows in fp16), the adapters float32 for the optimizer.
            pipe.unet.to(dtype=self._autocast_dtype)
            pipe.text_encoder.to(dtype=self._autocast_dtype)
        pipe.to(self.device)
        torch.manual_seed(self.seed)  # peft initialises lora_A from the global generator
        try:
            pipe.unet.add_adapter(LoraConfig(
                r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                target_modules=list(cfg.target_modules), init_lora_weights=True),
                adapter_name=_ADAPTER)
        except NoMatchingPeftModuleError as exc:
            raise TrainingRefused(f"no module of the UNet matches target_modules "
                                  f"{list(cfg.target_modules)}") from exc
        if cfg.train_text_encoder:
            pipe.text_encoder.add_adapter(LoraConfig(
                r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                target_modules=list(cfg.text_encoder_target_modules), init_lora_weights=True),
                adapter_name=_ADAPTER)
        self._trainable: dict[str, torch.nn.Parameter] = {}
        components = [("unet", pipe.unet)] + ([("te", pipe.text_encoder)] if cfg.train_text_encoder else [])
        for prefix, module in components:
            for name, param in module.named_parameters():
                if param.requires_grad:
                    param.data = param.data.float()
                    self._trainable[f"{prefix}.{name}"] = param
        if not self._trainable:
            raise TrainingRefused(f"no module of the UNet matches target_modules {list(cfg.target_modules)}")
        if cfg.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                pipe.text_encoder.gradient_checkpointing_enable()
        self._pipe = pipe

    def _params(self, prefix: str) -> list[torch.nn.Parameter]:
        return [param for name, param in self._trainable.items() if name.startswith(f"{prefix}.")]

    def _train_mode(self, training: bool) -> None:
        self._pipe.unet.train(training)
        self._pipe.text_encoder.train(training and self.cfg.train_text_encoder)

    def _build_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        from diffusers.optimization import get_scheduler

        cfg = self.cfg
        module_name, attribute, _ = _OPTIMIZERS[cfg.optimizer]
        optimizer_class = getattr(importlib.import_module(module_name), attribute)
        kwargs = dict(cfg.optimizer_args)
        relative_step = False
        if cfg.optimizer == "SGDNesterov":
            kwargs.setdefault("momentum", 0.9)
            kwargs["nesterov"] = True
        elif cfg.optimizer == "Adafactor":
            kwargs.setdefault("relative_step", True)
            if kwargs.get("warmup_init"):
                kwargs["relative_step"] = True
            relative_step = bool(kwargs["relative_step"])
            kwargs.setdefault("scale_parameter", relative_step)
        groups: list[dict[str, Any]] = []
        lrs = [("unet", cfg.unet_lr)] + ([("te", cfg.text_encoder_lr)] if cfg.train_text_encoder else [])
        for prefix, lr in lrs:
            group: dict[str, Any] = {"params": self._params(prefix)}
            if not relative_step:
                group["lr"] = lr if lr is not None else cfg.learning_rate
            groups.append(group)
        if relative_step:
            # Adafactor computes its own step size; the scheduler only reports it (kohya's
            # "adafactor" scheduler).
            from transformers.optimization import AdafactorSchedule

            optimizer = optimizer_class(groups, lr=None, **kwargs)
            schedule: Any = AdafactorSchedule
            return optimizer, schedule(optimizer, cfg.learning_rate)
        optimizer = optimizer_class(groups, lr=cfg.learning_rate, **kwargs)
        total = self._total_steps
        scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total,
            num_cycles=cfg.lr_scheduler_num_cycles, power=cfg.lr_scheduler_power)
        return optimizer, scheduler

    # ------------------------------------------------------------------ data

    def _items(self, examples: Sequence[TrainExample]) -> list[_Item]:
        items: list[_Item] = []
        default = (self.cfg.resolution, self.cfg.resolution)
        for index, example in enumerate(examples):
            bucket = example.bucket or default
            if bucket[0] % 8 or bucket[1] % 8 or min(bucket) < 8:
                raise TrainingRefused(f"bucket {bucket} of example {index} is not a multiple of 8")
            items.extend(_Item(index, bucket, example.is_reg, example.dataset)
                         for _ in range(max(1, example.repeats)))
        if not items:
            raise TrainingRefused("no training examples")
        return items

    def _epoch_batches(self, epoch: int) -> list[list[_Item]]:
        """This epoch's batches: same-size images together, in an order fixed by seed and epoch,
        so a resumed run needs only the position within the epoch."""
        generator = torch.Generator().manual_seed(_seed_from(self.seed, epoch))
        by_bucket: dict[tuple[int, tuple[int, int]], list[_Item]] = {}
        for item in self._all_items:
            by_bucket.setdefault((item.dataset, item.bucket), []).append(item)
        batches: list[list[_Item]] = []
        for key in sorted(by_bucket):
            members = by_bucket[key]
            order = torch.randperm(len(members), generator=generator).tolist()
            shuffled = [members[i] for i in order]
            size = self._examples[members[0].example].batch_size or self.cfg.batch_size
            batches.extend(shuffled[i:i + size] for i in range(0, len(shuffled), size))
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def _options(self, example: TrainExample) -> SubsetOptions:
        cfg = self.cfg
        return example.options or SubsetOptions(
            shuffle_caption=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens,
            caption_dropout_rate=cfg.caption_dropout_rate, flip_aug=cfg.flip_aug, color_aug=cfg.color_aug,
            random_crop=cfg.random_crop)

    def _caption(self, caption: str, options: SubsetOptions | None = None) -> str:
        """The text one step trains on, as kohya's ``process_caption``: prefix and suffix
        added, then dropped whole at ``caption_dropout_rate``, else its tags shuffled after the
        first ``keep_tokens`` (split at ``caption_separator``, joined with ", ")."""
        cfg = self.cfg
        options = options or SubsetOptions(shuffle_caption=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens,
                                           caption_dropout_rate=cfg.caption_dropout_rate)
        if options.caption_prefix:
            caption = options.caption_prefix + " " + caption
        if options.caption_suffix:
            caption = caption + " " + options.caption_suffix
        if options.caption_dropout_rate > 0 and self._py_rng.random() < options.caption_dropout_rate:
            return ""
        if not options.shuffle_caption:
            return caption
        tokens = [token.strip() for token in caption.split(options.caption_separator) if token.strip()]
        fixed, rest = tokens[:options.keep_tokens], tokens[options.keep_tokens:]
        self._py_rng.shuffle(rest)
        return ", ".join(fixed + rest)

    def _color_aug(self, image: Image.Image) -> Image.Image:
        """A small random hue shift (sd-scripts' color_aug shifts hue by up to 8 of 180 degrees)."""
        shift = self._py_rng.randint(-11, 11)  # of PIL's 256 hue steps
        hsv = np.asarray(image.convert("HSV"), dtype=np.int16).copy()
        hsv[..., 0] = (hsv[..., 0] + shift) % 256
        return Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")

    def _vae_digest(self) -> str:
        if self._vae_hash is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self._pipe.vae.state_dict().items()):
                digest.update(name.encode())
                digest.update(_tensor_bytes(tensor))
            self._vae_hash = digest.hexdigest()
        return self._vae_hash

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution (mean, std) for a batch of [-1, 1] images."""
        vae = self._pipe.vae
        dist = vae.encode(pixels.to(self.device, dtype=vae.dtype)).latent_dist
        mean: torch.Tensor = dist.mean.float()
        std: torch.Tensor = dist.std.float()
        return mean, std

    def _cache_latents(self, examples: Sequence[TrainExample]) -> None:
        """Encode every image once, before training, in memory and optionally on disk.

        The distribution is cached, not one sample of it: each step still draws its own
        sample from the training generator, so a cached run trains exactly like one that
        encodes every step, and a disk entry depends only on the image, size and VAE.
        """
        cache_dir = self.cfg.latents_cache_dir
        needed = {(item.example, item.bucket) for item in self._all_items}
        for index, bucket in sorted(needed):
            image = self._fitted[(index, bucket)]
            path = None
            if cache_dir is not None:
                key = f"{self._vae_digest()[:16]}-{_image_hash(examples[index].image, bucket)[:32]}"
                path = Path(cache_dir) / f"{key}.safetensors"
                if path.exists():
                    from safetensors.torch import load_file

                    stored = load_file(str(path))
                    self._latents[index] = (stored["mean"], stored["std"])
                    continue
            mean, std = self._encode(_to_tensor(image)[None])
            self._latents[index] = (mean[0].cpu(), std[0].cpu())
            if path is not None:
                from safetensors.torch import save_file

                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{uuid.uuid4().hex}.part")
                save_file({"mean": mean[0].cpu().contiguous(), "std": std[0].cpu().contiguous()}, str(tmp))
                os.replace(tmp, path)

    def _batch_latents(self, batch: list[_Item]) -> torch.Tensor:
        gen = self._gen
        if self.cfg.cache_latents:
            mean = torch.stack([self._latents[item.example][0] for item in batch])
            std = torch.stack([self._latents[item.example][1] for item in batch])
        else:
            images = []
            for item in batch:
                options = self._options(self._examples[item.example])
                image = (_crop(self._covered[(item.example, item.bucket)], item.bucket, gen)
                         if options.random_crop else self._fitted[(item.example, item.bucket)])
                if options.color_aug:
                    image = self._color_aug(image)
                pixels = _to_tensor(image)
                if options.flip_aug and torch.rand((), generator=gen).item() < 0.5:
                    pixels = pixels.flip(-1)
                images.append(pixels)
            mean, std = (part.cpu() for part in self._encode(torch.stack(images)))
        sample = mean + std * torch.randn(mean.shape, generator=gen)
        scaling: float = self._pipe.vae.config.scaling_factor
        return (sample * scaling).to(self.device)

    def _noise(self, latents: torch.Tensor) -> torch.Tensor:
        cfg, gen = self.cfg, self._gen
        batch, channels, height, width = latents.shape
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        if cfg.noise_offset:
            offset: float | torch.Tensor = cfg.noise_offset
            if cfg.adaptive_noise_scale:
                latent_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
                offset = (cfg.noise_offset + cfg.adaptive_noise_scale * latent_mean).clamp(min=0.0)
            noise = noise + offset * torch.randn((batch, channels, 1, 1), generator=gen).to(self.device)
        if cfg.multires_noise_iterations:
            # Pyramid noise: coarse noise upsampled and added with decaying weight.
            for level in range(1, cfg.multires_noise_iterations + 1):
                ratio = float(torch.rand((), generator=gen)) * 2 + 2
                h_level, w_level = max(1, int(height / ratio**level)), max(1, int(width / ratio**level))
                coarse = torch.randn((batch, channels, h_level, w_level), generator=gen).to(self.device)
                noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear") \
                    * cfg.multires_noise_discount**level
                if h_level == 1 or w_level == 1:
                    break
            noise = noise / noise.std()
        return noise

    def _token_chunks(self, captions: list[str]) -> torch.Tensor:
        """Token ids ``(batch, chunks, model_max_length)``, as kohya's ``get_input_ids``.

        With ``max_token_length`` 150 or 225 a caption is tokenized to that length plus BOS and
        EOS, then cut into 75-token pieces, each wrapped in BOS ... EOS so the text encoder
        (built for 77 positions) can read it.
        """
        tokenizer = self._pipe.tokenizer
        window = tokenizer.model_max_length  # 77: BOS, 75 tokens, EOS
        length = self.cfg.max_token_length + 2
        ids: torch.Tensor = tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                                      return_tensors="pt").input_ids
        if length <= window:
            return ids[:, None, :]
        inner = window - 2
        chunks = [torch.cat([ids[:, :1], ids[:, start:start + inner], ids[:, -1:]], dim=1)
                  for start in range(1, length - 1, inner)]
        return torch.stack(chunks, dim=1)

    def _text_embeddings(self, captions: list[str]) -> torch.Tensor:
        """The UNet's conditioning; for long captions kohya's concatenation of the chunks'
        states: the first BOS, each chunk's 75 token states, the last EOS."""
        pipe = self._pipe
        chunked = self._token_chunks(captions)
        batch, count, window = chunked.shape
        tokens = chunked.reshape(batch * count, window).to(self.device)
        grad: AbstractContextManager[Any] = nullcontext() if self.cfg.train_text_encoder else torch.no_grad()
        with grad:
            skip = self.cfg.clip_skip or 1
            if skip == 1:
                hidden: torch.Tensor = pipe.text_encoder(tokens)[0]
            else:
                output = pipe.text_encoder(tokens, output_hidden_states=True)
                encoder = pipe.text_encoder
                norm = encoder.text_model.final_layer_norm if hasattr(encoder, "text_model") \
                    else encoder.final_layer_norm
                hidden = norm(output.hidden_states[-skip])
            if count == 1:
                return hidden
            states = hidden.reshape(batch, count, window, -1)
            return torch.cat([states[:, 0, :1], *(states[:, i, 1:-1] for i in range(count)),
                              states[:, -1, -1:]], dim=1)

    def _autocast(self) -> AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def _loss(self, batch: list[_Item], examples: Sequence[TrainExample]) -> torch.Tensor:
        cfg = self.cfg
        latents = self._batch_latents(batch)
        noise = self._noise(latents)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=self._gen).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        captions = [self._caption(examples[item.example].caption, self._options(examples[item.example]))
                    for item in batch]
        with self._autocast():
            hidden = self._text_embeddings(captions)
            prediction = self._pipe.unet(noisy, timesteps, hidden).sample
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weights = torch.tensor([cfg.prior_loss_weight if item.is_reg else 1.0 for item in batch],
                               device=loss.device)
        loss = loss * weights
        if cfg.min_snr_gamma:
            snr = self.all_snr.to(loss.device)[timesteps]
            clipped = snr.clamp(max=cfg.min_snr_gamma)
            loss = loss * (clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr)
        return loss.mean()

    # ------------------------------------------------------------------ output

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters in kohya naming and ``save_precision``."""
        dtypes = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        dtype = dtypes[self.cfg.save_precision]
        out: dict[str, torch.Tensor] = {}
        for name, param in self._trainable.items():
            prefix, _, path = name.partition(".")
            if f".lora_A.{_ADAPTER}." not in path:
                continue
            module = path.split(f".lora_A.{_ADAPTER}.")[0]
            up = self._trainable[f"{prefix}.{module}.lora_B.{_ADAPTER}.weight"]
            key = _kohya_module("lora_unet" if prefix == "unet" else "lora_te", module)
            out[f"{key}.lora_down.weight"] = param.detach().to("cpu", dtype).contiguous()
            out[f"{key}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(self.cfg.alpha), dtype=dtype)
        return out

    def _metadata(self, examples: Sequence[TrainExample], *, step: int, epoch: int,
                  finished: bool) -> dict[str, str]:
        cfg = self.cfg
        tags: dict[str, Counter[str]] = {}
        dirs: dict[str, dict[str, int]] = {}
        for example in examples:
            subset = example.subset()
            entry = dirs.setdefault(subset, {"n_repeats": example.repeats, "img_count": 0})
            entry["img_count"] += 1
            counter = tags.setdefault(subset, Counter())
            counter.update(tag.strip() for tag in example.caption.split(",") if tag.strip())
        buckets = Counter(item.bucket for item in self._all_items)
        bucket_info = {"buckets": {str(i): {"resolution": list(size), "count": count}
                                   for i, (size, count) in enumerate(sorted(buckets.items()))},
                       "mean_img_ar_error": 0.0}
        # a dataset config's own batch size and resolution, where all its datasets agree (kohya
        # lists each in ss_datasets)
        batch_sizes = {example.batch_size or cfg.batch_size for example in examples}
        batch_size = batch_sizes.pop() if len(batch_sizes) == 1 else cfg.batch_size
        resolutions = {example.resolution or (cfg.resolution, cfg.resolution) for example in examples}
        resolution = resolutions.pop() if len(resolutions) == 1 else (cfg.resolution, cfg.resolution)
        datasets_meta: list[dict[str, object]] = []
        for number in sorted({example.dataset for example in examples}):
            members = [example for example in examples if example.dataset == number]
            in_dataset = [item for item in self._all_items if item.dataset == number]
            first = members[0]
            datasets_meta.append({
                "is_dreambooth": True, "batch_size_per_device": first.batch_size or cfg.batch_size,
                "num_train_images": sum(1 for item in in_dataset if not item.is_reg),
                "num_reg_images": sum(1 for item in in_dataset if item.is_reg),
                "resolution": list(first.resolution or (cfg.resolution, cfg.resolution)),
                "bucket_info": {"buckets": {str(i): {"resolution": list(size), "count": count}
                                            for i, (size, count) in enumerate(sorted(
                                                Counter(item.bucket for item in in_dataset).items()))}},
                "subsets": [{"image_dir": name, "num_repeats": example.repeats, "is_reg": example.is_reg,
                             **({"shuffle_caption": example.options.shuffle_caption,
                                 "keep_tokens": example.options.keep_tokens,
                                 "caption_dropout_rate": example.options.caption_dropout_rate,
                                 "flip_aug": example.options.flip_aug,
                                 "color_aug": example.options.color_aug,
                                 "random_crop": example.options.random_crop} if example.options else {})}
                            for name, example in {e.subset(): e for e in members}.items()],
            })
        unet_lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate
        te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
        now = time.time()
        optimizer = f"{_OPTIMIZERS[cfg.optimizer][0]}.{_OPTIMIZERS[cfg.optimizer][1]}"
        if cfg.optimizer_args:
            optimizer += "(" + ",".join(f"{k}={v}" for k, v in sorted(cfg.optimizer_args.items())) + ")"
        network_args: dict[str, str] = {}
        if tuple(cfg.target_modules) != UNET_TARGETS:
            network_args["target_modules"] = ",".join(cfg.target_modules)
        values: dict[str, object] = {
            "ss_session_id": self._session_id,
            "ss_training_started_at": self._progress.started_at,
            "ss_training_finished_at": now if finished else None,
            "ss_output_name": cfg.output_name,
            "ss_learning_rate": cfg.learning_rate,
            "ss_unet_lr": unet_lr,
            "ss_text_encoder_lr": te_lr if cfg.train_text_encoder else None,
            "ss_network_train_unet_only": not cfg.train_text_encoder,
            "ss_network_module": "networks.lora",
            "ss_network_dim": cfg.rank,
            "ss_network_alpha": cfg.alpha,
            "ss_network_dropout": cfg.dropout or None,
            "ss_network_args": json.dumps(network_args) if network_args else None,
            "ss_num_train_images": sum(1 for item in self._all_items if not item.is_reg),
            "ss_num_reg_images": sum(1 for item in self._all_items if item.is_reg),
            "ss_num_batches_per_epoch": self._batches_per_epoch,
            "ss_num_epochs": self._num_epochs,
            "ss_epoch": epoch,
            "ss_steps": step,
            "ss_batch_size_per_device": batch_size,
            "ss_total_batch_size": batch_size * cfg.gradient_accumulation_steps,
            "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "ss_gradient_checkpointing": cfg.gradient_checkpointing,
            "ss_max_train_steps": self._total_steps,
            "ss_lr_warmup_steps": cfg.lr_warmup_steps,
            "ss_lr_scheduler": "adafactor" if self._relative_step else cfg.lr_scheduler,
            "ss_optimizer": optimizer,
            "ss_max_grad_norm": cfg.max_grad_norm,
            "ss_mixed_precision": cfg.mixed_precision,
            "ss_full_fp16": False,
            "ss_v2": False,
            "ss_base_model_version": "sd_v1",
            "ss_v_parameterization": cfg.v_parameterization or None,
            "ss_resolution": f"({resolution[0]}, {resolution[1]})",
            "ss_enable_bucket": len(buckets) > 1 or any(example.bucket for example in examples),
            "ss_bucket_info": json.dumps(bucket_info),
            "ss_clip_skip": cfg.clip_skip,
            "ss_seed": self.seed,
            "ss_noise_offset": cfg.noise_offset,
            "ss_adaptive_noise_scale": cfg.adaptive_noise_scale,
            "ss_multires_noise_iterations": cfg.multires_noise_iterations,
            "ss_multires_noise_discount": (cfg.multires_noise_discount if cfg.multires_noise_iterations
                                           else None),
            "ss_min_snr_gamma": cfg.min_snr_gamma,
            "ss_prior_loss_weight": cfg.prior_loss_weight,
            "ss_cache_latents": cfg.cache_latents,
            "ss_flip_aug": cfg.flip_aug,
            "ss_color_aug": cfg.color_aug,
            "ss_random_crop": cfg.random_crop,
            "ss_max_token_length": cfg.max_token_length if cfg.max_token_length != 75 else None,
            "ss_shuffle_caption": cfg.shuffle_caption,
            "ss_keep_tokens": cfg.keep_tokens,
            "ss_caption_dropout_rate": cfg.caption_dropout_rate,
            "ss_sd_model_name": cfg.base_model_name or self.model_dir.name,
            "ss_sd_model_hash": cfg.base_model_hash,
            "ss_new_sd_model_hash": cfg.base_model_hash,
            "ss_dataset_dirs": json.dumps(dirs),
            "ss_datasets": (json.dumps(datasets_meta)
                            if any(example.options or example.batch_size for example in examples) else None),
            "ss_tag_frequency": json.dumps({name: dict(counter) for name, counter in tags.items()}),
            "ss_training_comment": cfg.training_comment or None,
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-v1/lora",
            "modelspec.implementation": "diffusers",
            "modelspec.title": cfg.output_name,
            "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
            "modelspec.date": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        }
        return {key: str(value) for key, value in values.items() if value is not None}

    def lora_bytes(self, examples: Sequence[TrainExample], *, step: int, epoch: int,
                   finished: bool = False) -> bytes:
        from safetensors.torch import save

        tensors = self.lora_state_dict()
        metadata = self._metadata(examples, step=step, epoch=epoch, finished=finished)
        # kohya's sshs_model_hash covers the tensor data only, so metadata edits keep it.
        bare: bytes = save(tensors)
        header_len = int.from_bytes(bare[:8], "little")
        metadata["sshs_model_hash"] = hashlib.sha256(bare[8 + header_len:]).hexdigest()
        data: bytes = save(tensors, metadata=metadata)
        return data

    # ------------------------------------------------------------------ state

    def _save_state(self, work_dir: Path, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any) -> Path:
        from safetensors.torch import save_file

        progress = self._progress
        target = work_dir / f"state-{progress.step}"
        staging = work_dir / f".state-{progress.step}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            save_file({name: param.detach().cpu().contiguous() for name, param in self._trainable.items()},
                      str(staging / "adapter.safetensors"))
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(scheduler.state_dict(), staging / "lr_scheduler.pt")
            rng: dict[str, Any] = {"torch": torch.get_rng_state(), "train": self._gen.get_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            if scaler is not None:
                rng["scaler"] = scaler.state_dict()
            torch.save(rng, staging / "rng.pt")
            version, internal, gauss = self._py_rng.getstate()
            (staging / "trainer.json").write_text(json.dumps({
                "step": progress.step, "epoch": progress.epoch, "batch": progress.batch,
                "started_at": progress.started_at, "seed": self.seed, "session_id": self._session_id,
                "items": len(self._all_items), "rank": self.cfg.rank,
                "trainable": sorted(self._trainable), "recent_losses": list(self._recent),
                "python_rng": [version, list(internal), gauss],
            }), encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _load_state(self, state_dir: Path, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any) -> None:
        from safetensors.torch import load_file

        missing = [name for name in _STATE_FILES if not (state_dir / name).exists()]
        if missing:
            raise ValueError(f"{state_dir} is not a training state (missing {', '.join(missing)})")
        info = json.loads((state_dir / "trainer.json").read_text(encoding="utf-8"))
        if info["trainable"] != sorted(self._trainable):
            raise TrainingRefused("the saved state has other adapter layers (rank, targets or "
                                  "text-encoder training differ from this configuration)")
        if info["items"] != len(self._all_items):
            raise TrainingRefused(f"the saved state was trained on {info['items']} images (with "
                                  f"repeats), this run has {len(self._all_items)}")
        if info["seed"] != self.seed:
            logger.warning("resuming a run seeded %s with seed %s: data order will differ",
                           info["seed"], self.seed)
        weights = load_file(str(state_dir / "adapter.safetensors"))
        with torch.no_grad():
            for name, param in self._trainable.items():
                param.copy_(weights[name].to(param.device, param.dtype))
        optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", map_location=self.device,
                                             weights_only=True))
        scheduler.load_state_dict(torch.load(state_dir / "lr_scheduler.pt", weights_only=True))
        rng = torch.load(state_dir / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        self._gen.set_state(rng["train"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if scaler is not None and "scaler" in rng:
            scaler.load_state_dict(rng["scaler"])
        version, internal, gauss = info["python_rng"]
        self._py_rng.setstate((version, tuple(internal), gauss))
        self._progress = _Progress(step=info["step"], epoch=info["epoch"], batch=info["batch"],
                                   started_at=info["started_at"])
        self._session_id = info["session_id"]
        self._recent.extend(info["recent_losses"])

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def _sample(self, step: int, on_sample: SampleCallback | None) -> None:
        if on_sample is None or not self.cfg.sample_prompts:
            return
        self._train_mode(False)
        # Leave the global generator as training left it: a run with previews repeats one without.
        rng_state = torch.get_rng_state()
        own_scheduler = self._pipe.scheduler
        try:
            for index, spec in enumerate(self.cfg.sample_prompts):
                self._pipe.scheduler = self._sample_scheduler(own_scheduler, spec.scheduler)
                generator = torch.Generator(self.device).manual_seed(spec.seed)
                with self._autocast():
                    image = self._pipe(
                        spec.prompt, negative_prompt=spec.negative or None, width=spec.width,
                        height=spec.height, num_inference_steps=spec.steps, guidance_scale=spec.scale,
                        generator=generator,
                        clip_skip=(self.cfg.clip_skip - 1) if self.cfg.clip_skip and self.cfg.clip_skip > 1
                        else None,
                    ).images[0]
                on_sample(step, index, image)
        finally:
            self._pipe.scheduler = own_scheduler
            torch.set_rng_state(rng_state)
            self._train_mode(True)

    @staticmethod
    def _sample_scheduler(own: Any, name: str | None) -> Any:
        """A fresh scheduler per image (they keep per-run state), on the model's own beta
        schedule and prediction type, as kohya's sample_images builds its sampler."""
        import diffusers

        if name is None:
            return type(own).from_config(own.config)
        class_name, extra = SCHEDULERS[name]
        return getattr(diffusers, class_name).from_config(own.config, **extra)

    # ------------------------------------------------------------------ the loop

    def train(
        self,
        examples: Sequence[TrainExample],
        *,
        work_dir: Path,
        on_step: StepCallback | None = None,
        on_sample: SampleCallback | None = None,
        on_checkpoint: CheckpointCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        resume_state: Path | None = None,
    ) -> TrainResult:
        """Train to the configured length (or until ``should_stop()``) and return the LoRA.

        ``on_step(step, total, epoch, loss_avg, lr, it_per_s, eta_s)`` counts steps and epochs
        from 1; ``on_checkpoint(step, lora_bytes, state_dir)`` gets the state folder when
        ``save_state`` is on.
        """
        cfg = self.cfg
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        self._examples = list(examples)
        if cfg.cache_latents and any(e.options and (e.options.flip_aug or e.options.color_aug
                                                    or e.options.random_crop) for e in examples):
            raise TrainingRefused("cache_latents cannot be combined with a subset's flip_aug, color_aug "
                                  "or random_crop: cached latents are encoded once, so augmentations "
                                  "would never apply")
        self._all_items = self._items(examples)
        # each image scaled once to cover its bucket; cropped once (centre) or, for a
        # random_crop subset, at a new offset each time a batch uses it
        self._covered = {(item.example, item.bucket): _cover(examples[item.example].image, item.bucket)
                         for item in self._all_items}
        self._fitted = {key: _crop(image, key[1]) for key, image in self._covered.items()}
        self._batches_per_epoch = len(self._epoch_batches(0))
        steps_per_epoch = math.ceil(self._batches_per_epoch / cfg.gradient_accumulation_steps)
        if cfg.max_train_epochs is not None:
            self._num_epochs = cfg.max_train_epochs
            self._total_steps = cfg.max_train_epochs * steps_per_epoch
        else:
            self._total_steps = cfg.max_train_steps
            self._num_epochs = math.ceil(cfg.max_train_steps / steps_per_epoch)
        self._relative_step = (cfg.optimizer == "Adafactor"
                               and bool(cfg.optimizer_args.get("relative_step", True)))
        self._gen = torch.Generator().manual_seed(self.seed)
        self._py_rng = random.Random(self.seed)
        self._progress = _Progress()
        self._session_id = str(random.SystemRandom().randrange(2**31))
        self._recent: deque[float] = deque(maxlen=max(1, steps_per_epoch))
        self.last_step_loss, self.last_step_time_s = 0.0, 0.0

        self._load()
        if cfg.cache_latents:
            self._cache_latents(examples)
        optimizer, scheduler = self._build_optimizer()
        scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None
        if resume_state is not None:
            self._load_state(Path(resume_state), optimizer, scheduler, scaler)
            logger.info("resumed from %s at step %d", resume_state, self._progress.step)
        self._train_mode(True)
        progress = self._progress
        losses: list[float] = []
        state_dir: Path | None = Path(resume_state) if resume_state is not None else None
        step_times: deque[float] = deque(maxlen=20)
        step_times.append(time.perf_counter())
        stopped = False
        # A state is written before its epoch's end-of-epoch work, which the resumed run then
        # redoes; what already happened at that step is not repeated.
        last_sample = progress.step if resume_state is not None else -1
        last_saved = progress.step if resume_state is not None else -1
        if cfg.sample_at_first and progress.step == 0:
            self._sample(0, on_sample)
            last_sample = 0

        def checkpoint() -> None:
            nonlocal state_dir, last_saved
            if last_saved == progress.step:
                return
            last_saved = progress.step
            saved = self._save_state(work_dir, optimizer, scheduler, scaler) if cfg.save_state else None
            state_dir = saved or state_dir
            if on_checkpoint is not None:
                on_checkpoint(progress.step, self.lora_bytes(examples, step=progress.step,
                                                             epoch=progress.epoch + 1), saved)

        while progress.step < self._total_steps and progress.epoch < self._num_epochs and not stopped:
            batches = self._epoch_batches(progress.epoch)
            while progress.batch < len(batches) and progress.step < self._total_steps:
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                group = batches[progress.batch:progress.batch + cfg.gradient_accumulation_steps]
                step_loss = 0.0
                for batch in group:
                    loss = self._loss(batch, examples) / len(group)
                    step_loss += float(loss.detach())
                    scaled: torch.Tensor = scaler.scale(loss) if scaler is not None else loss
                    torch.autograd.backward(scaled)
                params = list(self._trainable.values())
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                lr_used = self._current_lr(optimizer, scheduler)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.batch += len(group)
                progress.step += 1
                if not math.isfinite(step_loss):
                    logger.warning("non-finite loss %s at step %d", step_loss, progress.step)
                losses.append(step_loss)
                self._recent.append(step_loss)
                step_times.append(time.perf_counter())
                # this step alone (not the running average on_step gets), for the loss curve
                self.last_step_loss, self.last_step_time_s = step_loss, step_times[-1] - step_times[-2]
                if on_step is not None:
                    elapsed = step_times[-1] - step_times[0]
                    rate = (len(step_times) - 1) / elapsed if elapsed > 0 else 0.0
                    eta = (self._total_steps - progress.step) / rate if rate > 0 else 0.0
                    on_step(progress.step, self._total_steps, progress.epoch + 1, self._running_loss(),
                            lr_used, rate, eta)
                last_of_run = progress.step >= self._total_steps
                if (cfg.sample_every_n_steps and progress.step % cfg.sample_every_n_steps == 0
                        and last_sample != progress.step):
                    self._sample(progress.step, on_sample)
                    last_sample = progress.step
                if not last_of_run and cfg.save_every_n_steps and progress.step % cfg.save_every_n_steps == 0:
                    checkpoint()
            if stopped:
                break
            if progress.batch >= len(batches):
                finished_epoch = progress.epoch + 1
                progress.epoch += 1
                progress.batch = 0
                last_of_run = progress.step >= self._total_steps or progress.epoch >= self._num_epochs
                if (cfg.sample_every_n_epochs and finished_epoch % cfg.sample_every_n_epochs == 0
                        and last_sample != progress.step):
                    self._sample(progress.step, on_sample)
                    last_sample = progress.step
                every = cfg.save_every_n_epochs
                if not last_of_run and every and finished_epoch % every == 0:
                    checkpoint()

        if stopped:
            logger.info("training stopped on request at step %d", progress.step)
            if cfg.save_state and cfg.save_state_on_stop and 0 < progress.step != last_saved:
                last_saved = progress.step
                state_dir = self._save_state(work_dir, optimizer, scheduler, scaler)
        elif (cfg.sample_every_n_steps or cfg.sample_every_n_epochs) and last_sample != progress.step:
            self._sample(progress.step, on_sample)
        self._train_mode(False)
        epochs = min(self._num_epochs, progress.epoch + (1 if progress.batch else 0))
        return TrainResult(
            lora_bytes=self.lora_bytes(examples, step=progress.step, epoch=epochs, finished=not stopped),
            steps=progress.step, epochs=epochs, final_loss=self._running_loss(), state_dir=state_dir,
            stopped=stopped, losses=losses)

    def _running_loss(self) -> float:
        return sum(self._recent) / len(self._recent) if self._recent else float("nan")

    def _current_lr(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> float:
        lr = float(scheduler.get_last_lr()[0])
        group = optimizer.param_groups[0]
        if "d" in group:  # Prodigy reports its adapted step as d * lr
            lr *= float(group["d"])
        return lr


__all__ = ["LoraTrainer", "OptimizerUnavailable", "SamplePrompt", "TrainConfig", "TrainExample",
           "TrainResult", "TrainingRefused", "optimizer_available"]

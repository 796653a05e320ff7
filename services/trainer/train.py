"""A LoRA trainer for SD1.5-family diffusers models, with kohya sd-scripts' options and output.

peft injects the adapters into the very UNet (and, optionally, text encoder) the pipeline
samples with, so sample images during training use the current weights at no extra cost.
The file written at the end is kohya-format safetensors (``lora_unet_…``/``lora_te_…`` keys,
``.alpha`` tensors, ``ss_*`` metadata), which diffusers, A1111 and ComfyUI all load.

Everything random in a run flows from ``seed`` through generators the trainer owns (data
order per epoch, augmentation, latent sampling, noise, timesteps) or torch's global generator
(adapter init, dropout), and all of them are saved in a state: a resumed run repeats the
uninterrupted one exactly, on CPU bit for bit.

This module keeps the configuration and the loop; the seams live beside it: ``data`` (examples,
buckets, crops, captions, tokens), ``latents`` (VAE cache, noise), ``model`` (the pipeline with
adapters), ``optim``, ``state`` (resumable state), ``sampling`` (previews) and
``kohya_format`` (the file written). It stays a little over 500 lines because TrainConfig's
kohya options and the step loop are each one piece a reader wants whole.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image

from services.trainer import data, kohya_format, optim, state
from services.trainer.data import Item, TrainExample, color_aug, cover, crop, to_tensor
from services.trainer.errors import TrainingRefused
from services.trainer.kohya_format import UNET_TARGETS
from services.trainer.latents import cache_latents, training_noise, vae_digest
from services.trainer.model import load_for_training
from services.trainer.optim import OPTIMIZERS, OptimizerUnavailable, optimizer_available
from services.trainer.sampling import SamplePrompt, render_samples
from services.trainer.state import Progress
from shared.training import SubsetOptions  # the same model the gateway validates

logger = logging.getLogger(__name__)

OptimizerName = Literal["AdamW", "AdamW8bit", "Lion", "Lion8bit", "SGDNesterov", "Prodigy", "Adafactor"]
SchedulerName = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                        "polynomial"]
Precision = Literal["no", "fp16", "bf16"]
SavePrecision = Literal["float", "fp16", "bf16"]

TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


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
        if self.optimizer not in OPTIMIZERS:
            raise TrainingRefused(f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
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
        model = load_for_training(self.model_dir, self.cfg, device=self.device, seed=self.seed,
                                  autocast_dtype=self._autocast_dtype)
        self.noise_scheduler = model.noise_scheduler
        self.prediction_type: str = model.prediction_type
        self.all_snr: torch.Tensor = model.all_snr
        self._trainable: dict[str, torch.nn.Parameter] = model.trainable
        self._pipe = model.pipe

    def _params(self, prefix: str) -> list[torch.nn.Parameter]:
        return [param for name, param in self._trainable.items() if name.startswith(f"{prefix}.")]

    def _train_mode(self, training: bool) -> None:
        self._pipe.unet.train(training)
        self._pipe.text_encoder.train(training and self.cfg.train_text_encoder)

    def _build_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        return optim.build_optimizer(self.cfg, {"unet": self._params("unet"), "te": self._params("te")},
                                     self._total_steps)

    # ------------------------------------------------------------------ data

    def _items(self, examples: Sequence[TrainExample]) -> list[Item]:
        return data.expand_items(examples, (self.cfg.resolution, self.cfg.resolution))

    def _epoch_batches(self, epoch: int) -> list[list[Item]]:
        return data.epoch_batches(self._all_items, self._examples, seed=self.seed, epoch=epoch,
                                  batch_size=self.cfg.batch_size)

    def _options(self, example: TrainExample) -> SubsetOptions:
        cfg = self.cfg
        return example.options or SubsetOptions(
            shuffle_caption=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens,
            caption_dropout_rate=cfg.caption_dropout_rate, flip_aug=cfg.flip_aug, color_aug=cfg.color_aug,
            random_crop=cfg.random_crop)

    def _caption(self, caption: str, options: SubsetOptions | None = None) -> str:
        """The text one step trains on (``data.process_caption``), drawn from the run's
        Python generator; without ``options`` the TrainConfig's caption options apply."""
        cfg = self.cfg
        options = options or SubsetOptions(shuffle_caption=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens,
                                           caption_dropout_rate=cfg.caption_dropout_rate)
        return data.process_caption(caption, options, self._py_rng)

    def _vae_digest(self) -> str:
        if self._vae_hash is None:
            self._vae_hash = vae_digest(self._pipe.vae)
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
        """Encode every image once, before training (``latents.cache_latents``)."""
        needed = {(item.example, item.bucket) for item in self._all_items}
        self._latents.update(cache_latents(
            {key: self._fitted[key] for key in needed}, examples, encode=self._encode,
            cache_dir=self.cfg.latents_cache_dir, digest=self._vae_digest))

    def _batch_latents(self, batch: list[Item]) -> torch.Tensor:
        gen = self._gen
        if self.cfg.cache_latents:
            mean = torch.stack([self._latents[item.example][0] for item in batch])
            std = torch.stack([self._latents[item.example][1] for item in batch])
        else:
            images = []
            for item in batch:
                options = self._options(self._examples[item.example])
                image = (crop(self._covered[(item.example, item.bucket)], item.bucket, gen)
                         if options.random_crop else self._fitted[(item.example, item.bucket)])
                if options.color_aug:
                    image = color_aug(image, self._py_rng)
                pixels = to_tensor(image)
                if options.flip_aug and torch.rand((), generator=gen).item() < 0.5:
                    pixels = pixels.flip(-1)
                images.append(pixels)
            mean, std = (part.cpu() for part in self._encode(torch.stack(images)))
        sample = mean + std * torch.randn(mean.shape, generator=gen)
        scaling: float = self._pipe.vae.config.scaling_factor
        return (sample * scaling).to(self.device)

    def _noise(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        return training_noise(latents, self._gen, self.device, noise_offset=cfg.noise_offset,
                              adaptive_noise_scale=cfg.adaptive_noise_scale,
                              multires_noise_iterations=cfg.multires_noise_iterations,
                              multires_noise_discount=cfg.multires_noise_discount)

    def _text_embeddings(self, captions: list[str]) -> torch.Tensor:
        chunked = data.token_chunks(self._pipe.tokenizer, captions, self.cfg.max_token_length)
        return data.text_embeddings(self._pipe.text_encoder, chunked, device=self.device,
                                    clip_skip=self.cfg.clip_skip, trainable=self.cfg.train_text_encoder)

    def _autocast(self) -> AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def _loss(self, batch: list[Item], examples: Sequence[TrainExample]) -> torch.Tensor:
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
        return kohya_format.lora_state_dict(self._trainable, alpha=self.cfg.alpha,
                                            save_precision=self.cfg.save_precision)

    def _metadata(self, examples: Sequence[TrainExample], *, step: int, epoch: int,
                  finished: bool) -> dict[str, str]:
        return kohya_format.training_metadata(
            self.cfg, examples, self._all_items, step=step, epoch=epoch, finished=finished,
            session_id=self._session_id, started_at=self._progress.started_at,
            batches_per_epoch=self._batches_per_epoch, num_epochs=self._num_epochs,
            total_steps=self._total_steps, relative_step=self._relative_step, seed=self.seed,
            model_name=self.model_dir.name)

    def lora_bytes(self, examples: Sequence[TrainExample], *, step: int, epoch: int,
                   finished: bool = False) -> bytes:
        return kohya_format.lora_file(self.lora_state_dict(),
                                      self._metadata(examples, step=step, epoch=epoch, finished=finished))

    # ------------------------------------------------------------------ state

    def _save_state(self, work_dir: Path, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any) -> Path:
        return state.save_state(
            work_dir, progress=self._progress, trainable=self._trainable, optimizer=optimizer,
            scheduler=scheduler, scaler=scaler, generator=self._gen, py_rng=self._py_rng, seed=self.seed,
            session_id=self._session_id, items=len(self._all_items), rank=self.cfg.rank,
            recent_losses=self._recent)

    def _load_state(self, state_dir: Path, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any) -> None:
        resumed = state.load_state(
            state_dir, trainable=self._trainable, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            generator=self._gen, py_rng=self._py_rng, seed=self.seed, items=len(self._all_items),
            device=self.device)
        self._progress = resumed.progress
        self._session_id = resumed.session_id
        self._recent.extend(resumed.recent_losses)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def _sample(self, step: int, on_sample: SampleCallback | None) -> None:
        if on_sample is None or not self.cfg.sample_prompts:
            return
        self._train_mode(False)
        # Leave the global generator as training left it: a run with previews repeats one without.
        rng_state = torch.get_rng_state()
        try:
            render_samples(self._pipe, self.cfg.sample_prompts, device=self.device,
                           clip_skip=self.cfg.clip_skip, autocast=self._autocast,
                           on_image=lambda index, image: on_sample(step, index, image))
        finally:
            torch.set_rng_state(rng_state)
            self._train_mode(True)

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
        self._covered = {(item.example, item.bucket): cover(examples[item.example].image, item.bucket)
                         for item in self._all_items}
        self._fitted = {key: crop(image, key[1]) for key, image in self._covered.items()}
        self._batches_per_epoch = len(self._epoch_batches(0))
        steps_per_epoch = math.ceil(self._batches_per_epoch / cfg.gradient_accumulation_steps)
        if cfg.max_train_epochs is not None:
            self._num_epochs = cfg.max_train_epochs
            self._total_steps = cfg.max_train_epochs * steps_per_epoch
        else:
            self._total_steps = cfg.max_train_steps
            self._num_epochs = math.ceil(cfg.max_train_steps / steps_per_epoch)
        self._relative_step = optim.relative_step(cfg)
        self._gen = torch.Generator().manual_seed(self.seed)
        self._py_rng = random.Random(self.seed)
        self._progress = Progress()
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
        return optim.current_lr(optimizer, scheduler)


__all__ = ["LoraTrainer", "OptimizerUnavailable", "SamplePrompt", "TrainConfig", "TrainExample",
           "TrainResult", "TrainingRefused", "optimizer_available"]

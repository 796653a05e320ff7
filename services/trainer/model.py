"""The diffusers pipeline a LoRA trains in: loaded frozen, with peft adapters injected into the
UNet (and optionally the text encoder), and the DDPM schedule training noise follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.trainer.errors import TrainingRefused
from services.trainer.kohya_format import ADAPTER

if TYPE_CHECKING:
    from services.trainer.train import TrainConfig


@dataclass
class TrainingModel:
    pipe: Any
    noise_scheduler: Any
    prediction_type: str
    all_snr: torch.Tensor  # signal-to-noise ratio per timestep, for min_snr_gamma
    trainable: dict[str, torch.nn.Parameter]  # adapter weights, "unet."/"te." + peft's name


def load_for_training(model_dir: Path, cfg: TrainConfig, *, device: torch.device, seed: int,
                      autocast_dtype: torch.dtype | None) -> TrainingModel:
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig as _LoraConfig
    from peft import NoMatchingPeftModuleError

    # peft annotates lora_alpha as int; kohya's alpha may be fractional and peft divides it.
    LoraConfig: Any = _LoraConfig  # noqa: N806
    pipeline_class: Any = StableDiffusionPipeline
    pipe = pipeline_class.from_pretrained(
        model_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prediction = "v_prediction" if cfg.v_parameterization else pipe.scheduler.config.prediction_type
    if prediction != pipe.scheduler.config.prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config,
                                                          prediction_type=prediction)
    # Training noise follows the model's own beta schedule, as DDPM defines it.
    ddpm: Any = DDPMScheduler
    noise_scheduler = ddpm.from_config(pipe.scheduler.config, prediction_type=prediction, clip_sample=False)
    alphas = noise_scheduler.alphas_cumprod.float()
    all_snr: torch.Tensor = alphas / (1.0 - alphas)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    if device.type == "cuda" and autocast_dtype is not None:
        # Frozen base weights in the compute dtype; the VAE stays float32 (SD1.5's VAE
        # overflows in fp16), the adapters float32 for the optimizer.
        pipe.unet.to(dtype=autocast_dtype)
        pipe.text_encoder.to(dtype=autocast_dtype)
    pipe.to(device)
    torch.manual_seed(seed)  # peft initialises lora_A from the global generator
    try:
        pipe.unet.add_adapter(LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules), init_lora_weights=True),
            adapter_name=ADAPTER)
    except NoMatchingPeftModuleError as exc:
        raise TrainingRefused(f"no module of the UNet matches target_modules "
                              f"{list(cfg.target_modules)}") from exc
    if cfg.train_text_encoder:
        pipe.text_encoder.add_adapter(LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
            target_modules=list(cfg.text_encoder_target_modules), init_lora_weights=True),
            adapter_name=ADAPTER)
    trainable: dict[str, torch.nn.Parameter] = {}
    components = [("unet", pipe.unet)] + ([("te", pipe.text_encoder)] if cfg.train_text_encoder else [])
    for prefix, module in components:
        for name, param in module.named_parameters():
            if param.requires_grad:
                param.data = param.data.float()
                trainable[f"{prefix}.{name}"] = param
    if not trainable:
        raise TrainingRefused(f"no module of the UNet matches target_modules {list(cfg.target_modules)}")
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            pipe.text_encoder.gradient_checkpointing_enable()
    return TrainingModel(pipe=pipe, noise_scheduler=noise_scheduler, prediction_type=prediction,
                         all_snr=all_snr, trainable=trainable)

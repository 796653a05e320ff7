"""Optimizers and learning-rate schedules by kohya sd-scripts' names.

The optional optimizers (bitsandbytes, lion-pytorch, prodigyopt) are imported only when asked
for, so a worker without them still trains with AdamW and says which package is missing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from services.trainer.train import TrainConfig

# Where each optimizer lives: (module, attribute, pip package that provides it).
OPTIMIZERS: dict[str, tuple[str, str, str]] = {
    "AdamW": ("torch.optim", "AdamW", "torch"),
    "SGDNesterov": ("torch.optim", "SGD", "torch"),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "Lion8bit": ("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "Adafactor": ("transformers.optimization", "Adafactor", "transformers"),
}


class OptimizerUnavailable(RuntimeError):
    """The optimizer asked for needs a package this worker does not have."""


def optimizer_available(name: str) -> None:
    """Raise ``OptimizerUnavailable`` unless ``name``'s package imports here."""
    module, attribute, package = OPTIMIZERS[name]
    try:
        getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, RuntimeError) as exc:  # bitsandbytes raises RuntimeError
        raise OptimizerUnavailable(
            f"optimizer {name} needs the {package!r} package, which is not installed on this worker "
            f"({type(exc).__name__}: {exc}); choose AdamW, SGDNesterov or Adafactor, or install "
            f"{package}") from exc


def relative_step(cfg: TrainConfig) -> bool:
    """Whether Adafactor computes its own step size (kohya's "adafactor" scheduler)."""
    return cfg.optimizer == "Adafactor" and bool(cfg.optimizer_args.get("relative_step", True))


def optimizer_label(cfg: TrainConfig) -> str:
    """The optimizer as kohya's ``ss_optimizer`` names it: its class path and arguments."""
    label = f"{OPTIMIZERS[cfg.optimizer][0]}.{OPTIMIZERS[cfg.optimizer][1]}"
    if cfg.optimizer_args:
        label += "(" + ",".join(f"{k}={v}" for k, v in sorted(cfg.optimizer_args.items())) + ")"
    return label


def build_optimizer(cfg: TrainConfig, params: dict[str, list[torch.nn.Parameter]],
                    total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer over ``params`` (by component: "unet", "te") and its scheduler."""
    from diffusers.optimization import get_scheduler

    module_name, attribute, _ = OPTIMIZERS[cfg.optimizer]
    optimizer_class = getattr(importlib.import_module(module_name), attribute)
    kwargs = dict(cfg.optimizer_args)
    relative = False
    if cfg.optimizer == "SGDNesterov":
        kwargs.setdefault("momentum", 0.9)
        kwargs["nesterov"] = True
    elif cfg.optimizer == "Adafactor":
        kwargs.setdefault("relative_step", True)
        if kwargs.get("warmup_init"):
            kwargs["relative_step"] = True
        relative = bool(kwargs["relative_step"])
        kwargs.setdefault("scale_parameter", relative)
    groups: list[dict[str, Any]] = []
    lrs = [("unet", cfg.unet_lr)] + ([("te", cfg.text_encoder_lr)] if cfg.train_text_encoder else [])
    for prefix, lr in lrs:
        group: dict[str, Any] = {"params": params[prefix]}
        if not relative:
            group["lr"] = lr if lr is not None else cfg.learning_rate
        groups.append(group)
    if relative:
        # Adafactor computes its own step size; the scheduler only reports it (kohya's
        # "adafactor" scheduler).
        from transformers.optimization import AdafactorSchedule

        optimizer = optimizer_class(groups, lr=None, **kwargs)
        schedule: Any = AdafactorSchedule
        return optimizer, schedule(optimizer, cfg.learning_rate)
    optimizer = optimizer_class(groups, lr=cfg.learning_rate, **kwargs)
    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total_steps,
        num_cycles=cfg.lr_scheduler_num_cycles, power=cfg.lr_scheduler_power)
    return optimizer, scheduler


def current_lr(optimizer: torch.optim.Optimizer, scheduler: Any) -> float:
    lr = float(scheduler.get_last_lr()[0])
    group = optimizer.param_groups[0]
    if "d" in group:  # Prodigy reports its adapted step as d * lr
        lr *= float(group["d"])
    return lr

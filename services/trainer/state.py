"""Resumable training state: adapter weights, optimizer, scheduler, every generator and the
position in the data, written so that a resumed run repeats the uninterrupted one exactly.

A state is staged in a hidden folder and renamed into place, so a crash mid-write never
leaves a state that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.trainer.errors import TrainingRefused

logger = logging.getLogger(__name__)

STATE_FILES = ("adapter.safetensors", "optimizer.pt", "lr_scheduler.pt", "rng.pt", "trainer.json")


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch being trained, from 0
    batch: int = 0  # batches of that epoch already used
    started_at: float = field(default_factory=time.time)


@dataclass
class Resumed:
    """What a saved state hands back to the loop besides the tensors it restores in place."""

    progress: Progress
    session_id: str
    recent_losses: list[float]


def save_state(work_dir: Path, *, progress: Progress, trainable: Mapping[str, torch.nn.Parameter],
               optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, generator: torch.Generator,
               py_rng: random.Random, seed: int, session_id: str, items: int, rank: int,
               recent_losses: Iterable[float]) -> Path:
    from safetensors.torch import save_file

    target = work_dir / f"state-{progress.step}"
    staging = work_dir / f".state-{progress.step}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        save_file({name: param.detach().cpu().contiguous() for name, param in trainable.items()},
                  str(staging / "adapter.safetensors"))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "lr_scheduler.pt")
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "train": generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if scaler is not None:
            rng["scaler"] = scaler.state_dict()
        torch.save(rng, staging / "rng.pt")
        version, internal, gauss = py_rng.getstate()
        (staging / "trainer.json").write_text(json.dumps({
            "step": progress.step, "epoch": progress.epoch, "batch": progress.batch,
            "started_at": progress.started_at, "seed": seed, "session_id": session_id,
            "items": items, "rank": rank,
            "trainable": sorted(trainable), "recent_losses": list(recent_losses),
            "python_rng": [version, list(internal), gauss],
        }), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_state(state_dir: Path, *, trainable: Mapping[str, torch.nn.Parameter],
               optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, generator: torch.Generator,
               py_rng: random.Random, seed: int, items: int, device: torch.device) -> Resumed:
    """Restore ``state_dir`` into the given objects, refusing a state of another run's shape."""
    from safetensors.torch import load_file

    missing = [name for name in STATE_FILES if not (state_dir / name).exists()]
    if missing:
        raise ValueError(f"{state_dir} is not a training state (missing {', '.join(missing)})")
    info = json.loads((state_dir / "trainer.json").read_text(encoding="utf-8"))
    if info["trainable"] != sorted(trainable):
        raise TrainingRefused("the saved state has other adapter layers (rank, targets or "
                              "text-encoder training differ from this configuration)")
    if info["items"] != items:
        raise TrainingRefused(f"the saved state was trained on {info['items']} images (with "
                              f"repeats), this run has {items}")
    if info["seed"] != seed:
        logger.warning("resuming a run seeded %s with seed %s: data order will differ",
                       info["seed"], seed)
    weights = load_file(str(state_dir / "adapter.safetensors"))
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", map_location=device,
                                         weights_only=True))
    scheduler.load_state_dict(torch.load(state_dir / "lr_scheduler.pt", weights_only=True))
    rng = torch.load(state_dir / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["train"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if scaler is not None and "scaler" in rng:
        scaler.load_state_dict(rng["scaler"])
    version, internal, gauss = info["python_rng"]
    py_rng.setstate((version, tuple(internal), gauss))
    return Resumed(progress=Progress(step=info["step"], epoch=info["epoch"], batch=info["batch"],
                                     started_at=info["started_at"]),
                   session_id=info["session_id"], recent_losses=list(info["recent_losses"]))

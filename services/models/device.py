"""Which device a worker runs its models on when its settings say ``auto``."""

from __future__ import annotations


def pick_device(wanted: str, *, mps: bool = True) -> str:
    """``wanted`` unless it is ``auto``: then CUDA, else Apple's MPS, else the CPU.

    ``mps=False`` is for the trainer and the tagger, whose ``auto`` has always meant CUDA or
    the CPU: their code was never run on MPS, so a Mac keeps them on the CPU unless asked.
    """
    if wanted != "auto":
        return wanted
    import torch  # the settings-only callers (gateway, CLI) never come here

    if torch.cuda.is_available():
        return "cuda"
    if mps and torch.backends.mps.is_available():
        return "mps"
    return "cpu"

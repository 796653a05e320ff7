"""Running a grouped pipeline call so that every job's pixels equal its solo run.

Batched kernels (CPU GEMM/convolution, cuDNN) pick different blockings for different batch
sizes, so the same row rounds differently in a batch of 4 than in a batch of 1: images drift
by a level here and there. While a grouped call is rendered, each model's forward is split
into the exact slices a solo run would have sent (a job's rows; with classifier-free
guidance, its rows in both the negative and the positive half), so every job sees the same
shapes, and therefore the same arithmetic, as when it runs alone. Grouping still saves
everything around the model calls (scheduler steps, Python and pipeline overhead, one
callback per step for all jobs); ``batch_exact = false`` turns the split off for raw
throughput at the cost of +-1 level differences.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def _slices(batch: int, sizes: list[int]) -> list[list[int]] | None:
    """Row indices per job for a module called with ``batch`` rows, or None if unknown."""
    total = sum(sizes)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    if batch == total:
        return [list(range(o, o + n)) for o, n in zip(offsets, sizes, strict=True)]
    if batch == 2 * total:  # classifier-free guidance: [negatives..., positives...]
        return [list(range(o, o + n)) + list(range(total + o, total + o + n))
                for o, n in zip(offsets, sizes, strict=True)]
    return None


def _batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    first = args[0] if args else next(iter(kwargs.values()), None)
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim > 0 else None


def _take(value: Any, rows: list[int], batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, dict):
        return {k: _take(v, rows, batch) for k, v in value.items()}
    if isinstance(value, list | tuple) and value and all(
            isinstance(v, torch.Tensor) for v in value):
        return type(value)(_take(v, rows, batch) for v in value)
    return value


def _merge(parts: list[Any], slices: list[list[int]], batch: int) -> Any:
    first = parts[0]
    if hasattr(first, "parameters") and isinstance(first.parameters, torch.Tensor):
        # The VAE encoder's DiagonalGaussianDistribution: rebuild it from merged parameters.
        return type(first)(_merge([p.parameters for p in parts], slices, batch))
    if isinstance(first, torch.Tensor):
        if first.ndim == 0 or sum(len(s) for s in slices) != batch:
            return first
        out = first.new_empty((batch, *first.shape[1:]))
        for part, rows in zip(parts, slices, strict=True):
            out[rows] = part
        return out
    if isinstance(first, tuple | list):
        merged = [_merge([p[i] for p in parts], slices, batch) for i in range(len(first))]
        return type(first)(merged) if not hasattr(first, "_fields") else type(first)(*merged)
    if isinstance(first, dict):  # diffusers BaseOutput and transformers ModelOutput
        merged_dict = {k: _merge([p[k] for p in parts], slices, batch) for k in first}
        return type(first)(**merged_dict)
    return first


def _split_call(fn: Any, sizes: list[int]) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        batch = _batch_of(args, kwargs)
        slices = _slices(batch, sizes) if batch is not None else None
        if batch is None or slices is None or len(slices) == 1:
            return fn(*args, **kwargs)
        parts = [fn(*(_take(a, rows, batch) for a in args),
                    **{k: v if k.endswith("_ids") else _take(v, rows, batch)
                       for k, v in kwargs.items()})
                 for rows in slices]
        return _merge(parts, slices, batch)
    return call


@contextlib.contextmanager
def per_job_calls(pipe: Any, sizes: list[int]) -> Iterator[None]:
    """Within the block, the pipeline's models run once per job (see module docstring)."""
    if len(sizes) < 2:
        yield
        return
    patched: list[tuple[Any, str, Any]] = []
    names = ("unet", "transformer", "controlnet", "text_encoder", "text_encoder_2",
             "text_encoder_3")
    for name in names:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            patched.append((module, "forward", module.forward))
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        patched.extend((vae, method, getattr(vae, method)) for method in ("encode", "decode"))
    # accelerate's offload hooks are instance attributes too: put back exactly what was there.
    own = [(owner, attr, original, attr in vars(owner)) for owner, attr, original in patched]
    try:
        for owner, attr, original, _ in own:
            setattr(owner, attr, _split_call(original, sizes))
        yield
    finally:
        for owner, attr, original, was_own in own:
            if was_own:
                setattr(owner, attr, original)
            else:
                with contextlib.suppress(AttributeError):
                    delattr(owner, attr)

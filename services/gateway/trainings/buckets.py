"""kohya's aspect-ratio buckets and epoch counting, for planning a training at the gateway.

:func:`fit_to_bucket` is kohya's ``BucketManager.select_bucket`` over the buckets
:func:`services.gateway.datasets.kohya.make_buckets` lists; :func:`epoch_plan` is DreamBooth's
regularisation balancing plus per-bucket batching. The gateway assigns every image its bucket
when it plans a training (the trainer receives the bucket with each example), so this runs
nowhere else. The rules the options must satisfy are :func:`shared.kohya.bucketing_problems`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple


class BucketFit(NamedTuple):
    """Where kohya puts one image: resized to ``resized`` (covering the bucket), then cropped
    to ``bucket``; ``crop`` is the (left, top) offset of kohya's centre crop (``random_crop``
    picks a random offset instead). ``ar_error`` is bucket aspect minus image aspect."""

    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int]
    ar_error: float


def _round_to_steps(value: float, steps: int) -> int:
    rounded = int(value + 0.5)
    return rounded - rounded % steps


def fit_to_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]], *, no_upscale: bool = False,
                  max_area: int | None = None, steps: int = 64) -> BucketFit:
    """kohya's ``BucketManager.select_bucket`` plus its resize and centre crop.

    Normally: the image's own size if it is a bucket, else the bucket whose aspect ratio is
    closest (smallest ``|bucket_ar - image_ar|``, the first in ``buckets`` order on a tie);
    the image is scaled, rounding half up, so that it covers the bucket. With ``no_upscale``
    the ``buckets`` are ignored: an image over ``max_area`` pixels (the resolution's area) is
    shrunk to that area, with whichever side rounds to ``steps`` with the smaller aspect error,
    and the bucket is the (resized) size rounded down to ``steps``, so nothing is ever enlarged.
    """
    if width < 1 or height < 1:
        raise ValueError(f"bad image size {width}x{height}")
    aspect = width / height
    if not no_upscale:
        if not buckets:
            raise ValueError("no buckets to choose from")
        bucket = (width, height) if (width, height) in buckets else min(
            buckets, key=lambda b: abs(b[0] / b[1] - aspect))
        scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    else:
        if max_area is None:
            raise ValueError("no_upscale needs max_area (the resolution's width * height)")
        if width * height > max_area:
            scaled_width = math.sqrt(max_area * aspect)
            scaled_height = max_area / scaled_width
            by_width = _round_to_steps(scaled_width, steps)
            height_for_width = _round_to_steps(by_width / aspect, steps)
            by_height = _round_to_steps(scaled_height, steps)
            width_for_height = _round_to_steps(by_height * aspect, steps)
            error_w = abs(by_width / height_for_width - aspect) if height_for_width else math.inf
            error_h = abs(width_for_height / by_height - aspect) if by_height else math.inf
            if error_w < error_h:
                resized = (by_width, int(by_width / aspect + 0.5))
            else:
                resized = (int(by_height * aspect + 0.5), by_height)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
        if 0 in bucket:
            raise ValueError(f"a {width}x{height} image is narrower than one bucket step ({steps})")
    crop = (max(0, resized[0] - bucket[0]) // 2, max(0, resized[1] - bucket[1]) // 2)
    return BucketFit(bucket, resized, crop, bucket[0] / bucket[1] - aspect)


def assign_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]], *, no_upscale: bool = False,
                  max_area: int | None = None, steps: int = 64) -> tuple[int, int]:
    """The bucket kohya trains a ``width`` x ``height`` image at (see :func:`fit_to_bucket`)."""
    return fit_to_bucket(width, height, buckets, no_upscale=no_upscale, max_area=max_area, steps=steps).bucket


# Epochs


@dataclass(frozen=True, kw_only=True)
class EpochPlan:
    """What one kohya epoch holds: ``reg_repeats`` is, per input subset, how often each of its
    images is used (0 for unused regularisation images); ``bucket_items`` counts items per bucket."""

    train_items: int
    reg_items: int
    reg_repeats: tuple[tuple[int, ...], ...]
    bucket_items: Mapping[tuple[int, int], int]
    steps: int


_ONE_BUCKET = (0, 0)


def epoch_plan(subsets: Sequence[tuple[int, int, bool]], *, batch_size: int,
               buckets_of_images: Sequence[Sequence[tuple[int, int]]] | None = None) -> EpochPlan:
    """Count one epoch the way kohya's DreamBooth dataset does.

    ``subsets`` are ``(image_count, num_repeats, is_reg)`` in config order; ``buckets_of_images``
    gives, per subset, each image's bucket in kohya's (sorted file name) order; None means one
    bucket for all (bucketing off). Training items are ``image_count * num_repeats`` summed.
    Regularisation images are then taken in order, each with its subset's repeats, until they
    reach the training count (so with repeats above 1 they may overshoot it slightly; the rest
    go unused); if all of them fall short, each gets one more repeat in turn until they match.
    No training items means no regularisation. Items are batched per bucket, so the epoch has
    ``sum(ceil(items_in_bucket / batch_size))`` steps (before gradient accumulation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if buckets_of_images is not None and len(buckets_of_images) != len(subsets):
        raise ValueError("buckets_of_images needs one entry per subset")
    repeats: list[list[int]] = []
    for index, (count, num_repeats, _) in enumerate(subsets):
        if count < 0 or num_repeats < 1:
            raise ValueError(f"subset {index}: bad image count {count} or num_repeats {num_repeats}")
        if buckets_of_images is not None and len(buckets_of_images[index]) != count:
            raise ValueError(f"subset {index}: {len(buckets_of_images[index])} buckets for {count} images")
        repeats.append([num_repeats] * count)
    train_items = sum(sum(r) for r, (_, _, is_reg) in zip(repeats, subsets, strict=True) if not is_reg)
    reg_images = [(s, i) for s, (count, _, is_reg) in enumerate(subsets) if is_reg for i in range(count)]
    used = [0] * len(reg_images)
    total = 0
    for position, (s, i) in enumerate(reg_images):
        if total >= train_items:
            break
        used[position] = repeats[s][i]
        total += used[position]
    while reg_images and total < train_items:
        for position in range(len(reg_images)):
            used[position] += 1
            total += 1
            if total >= train_items:
                break
    for position, (s, i) in enumerate(reg_images):
        repeats[s][i] = used[position]
    buckets: Counter[tuple[int, int]] = Counter()
    for s, image_repeats in enumerate(repeats):
        for i, times in enumerate(image_repeats):
            if times:
                buckets[_ONE_BUCKET if buckets_of_images is None else buckets_of_images[s][i]] += times
    return EpochPlan(
        train_items=train_items, reg_items=total,
        reg_repeats=tuple(tuple(r) for r in repeats),
        bucket_items=MappingProxyType(dict(buckets)),
        steps=sum(-(-items // batch_size) for items in buckets.values()),
    )


def steps_per_epoch(subsets: Sequence[tuple[int, int, bool]], *, batch_size: int,
                    buckets_of_images: Sequence[Sequence[tuple[int, int]]] | None = None) -> int:
    """Optimiser steps in one kohya epoch (before gradient accumulation); see :func:`epoch_plan`."""
    return epoch_plan(subsets, batch_size=batch_size, buckets_of_images=buckets_of_images).steps

"""The dataset report: what a user should fix before paying for a training run."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import TypedDict

from services.gateway.datasets.ingest import SubsetInfo

_ASPECT_BUCKETS: tuple[tuple[str, float], ...] = (
    ("1:1", 1.0), ("4:3", 4 / 3), ("3:4", 3 / 4), ("3:2", 3 / 2), ("2:3", 2 / 3),
    ("16:9", 16 / 9), ("9:16", 9 / 16),
)
ASPECT_TOLERANCE = 0.05
TOP_TAGS = 50


@dataclass(frozen=True, kw_only=True)
class ItemSummary:
    """What the report needs of one stored image; tags come from the tagger, when it has run."""

    subset: SubsetInfo
    width: int
    height: int
    caption: str | None = None
    tags: list[str] = field(default_factory=list)
    flags: tuple[str, ...] = ()


class SubsetReport(TypedDict):
    name: str
    repeats: int
    identifier: str | None
    class_token: str | None
    is_reg: bool
    images: int


class Totals(TypedDict):
    images: int
    train_images: int
    reg_images: int
    # What kohya counts as one epoch's training images: repeats times images, per subset.
    repeated_train_images: int
    repeated_reg_images: int


class SideStats(TypedDict):
    min: int
    max: int
    median: float


class SizeStats(TypedDict):
    width: SideStats
    height: SideStats


class CaptionCounts(TypedDict):
    present: int
    missing: int
    tagged: int  # items with at least one tag, whether captioned or not


class TagCount(TypedDict):
    tag: str
    count: int


class DatasetReport(TypedDict):
    subsets: list[SubsetReport]
    totals: Totals
    size: SizeStats | None
    aspect_ratios: dict[str, int]
    captions: CaptionCounts
    tags: list[TagCount]
    flags: dict[str, int]
    flagged: int
    duplicates: int


def aspect_bucket(width: int, height: int) -> str:
    """The nearest common ratio when within 5% of it, else "other": a user sees at a glance
    whether the set is mostly portraits, squares or landscapes."""
    ratio = width / height
    name, target = min(_ASPECT_BUCKETS, key=lambda bucket: abs(ratio / bucket[1] - 1))
    return name if abs(ratio / target - 1) <= ASPECT_TOLERANCE else "other"


def build_report(items: list[ItemSummary], *, duplicates: int = 0) -> DatasetReport:
    """Summarise a dataset so a user can fix it before paying for a training run."""
    counts: Counter[SubsetInfo] = Counter(item.subset for item in items)
    subsets = [
        SubsetReport(name=s.name, repeats=s.repeats, identifier=s.identifier, class_token=s.class_token,
                     is_reg=s.is_reg, images=n)
        for s, n in sorted(counts.items(), key=lambda pair: (pair[0].is_reg, pair[0].name))
    ]
    totals = Totals(
        images=len(items),
        train_images=sum(n for s, n in counts.items() if not s.is_reg),
        reg_images=sum(n for s, n in counts.items() if s.is_reg),
        repeated_train_images=sum(n * s.repeats for s, n in counts.items() if not s.is_reg),
        repeated_reg_images=sum(n * s.repeats for s, n in counts.items() if s.is_reg),
    )
    size: SizeStats | None = None
    if items:
        widths = [item.width for item in items]
        heights = [item.height for item in items]
        size = SizeStats(
            width=SideStats(min=min(widths), max=max(widths), median=float(statistics.median(widths))),
            height=SideStats(min=min(heights), max=max(heights), median=float(statistics.median(heights))),
        )
    aspect_ratios = dict.fromkeys([name for name, _ in _ASPECT_BUCKETS] + ["other"], 0)
    for item in items:
        aspect_ratios[aspect_bucket(item.width, item.height)] += 1
    tag_counts: Counter[str] = Counter()
    for item in items:
        tag_counts.update({tag.strip() for tag in item.tags if tag.strip()})
    top = sorted(tag_counts.items(), key=lambda pair: (-pair[1], pair[0]))[:TOP_TAGS]
    flag_counts: Counter[str] = Counter(flag for item in items for flag in set(item.flags))
    present = sum(1 for item in items if item.caption)
    return DatasetReport(
        subsets=subsets,
        totals=totals,
        size=size,
        aspect_ratios=aspect_ratios,
        captions=CaptionCounts(present=present, missing=len(items) - present,
                               tagged=sum(1 for item in items if any(t.strip() for t in item.tags))),
        tags=[TagCount(tag=tag, count=count) for tag, count in top],
        flags=dict(sorted(flag_counts.items())),
        flagged=sum(1 for item in items if item.flags),
        duplicates=duplicates,
    )



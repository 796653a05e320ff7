"""kohya sd-scripts' dataset layout as kohya reads it: the dataset config TOML and folder names.

What a LoRA training needs to know about its data before any tensor exists: whether a user's
``dataset_config.toml`` means what they think it means, which aspect-ratio buckets kohya
will train at, and what a folder named ``img/10_sks dog`` holds. Everything here follows
sd-scripts' own rules (``library/config_util.py`` and ``library/train_util.py``),
re-implemented from their documented behaviour; where Loomis is stricter than kohya (kohya
warns or silently ignores) the docstring says so.

* :func:`parse_dataset_config` reads ``[general]`` / ``[[datasets]]`` / ``[[datasets.subsets]]``
  with kohya's inheritance: a subset's value comes from the subset, else its dataset, else
  ``[general]``, else the trainer's own arguments (``defaults``), else kohya's default.
* :func:`make_buckets` is kohya's ``make_bucket_resolutions``; how resolution and bucket
  options must relate is :func:`shared.kohya.bucketing_problems`, which the request's own
  ``data`` options obey too. Fitting images to buckets and counting an epoch are
  ``services/gateway/trainings/buckets.py``'s.
* :func:`parse_subset_dir` reads kohya's folder names (``img/10_sks dog``), for uploads and
  for :func:`subset_from_folder` alike.

The gateway's alone: dataset uploads read it, and trainings resolve it into per-image
examples (``shared.training.TrainingExample``) before a job exists; the trainer never reads
the TOML. Errors are :class:`shared.kohya.ConfigError`, the one kohya config error both sides raise.

One file although it is over 500 lines: these are one format's rules, and the parser, the
folder names and the buckets share its key tables, defaults and errors.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from shared.kohya import (
    MAX_BUCKET_RESO_STEPS,
    MAX_RESOLUTION,
    MIN_RESOLUTION,
    RESOLUTION_MULTIPLE,
    ConfigError,
    bucketing_problems,
)

# ---------------------------------------------------------------------------------------------
# Dataset config models


class SubsetMode(StrEnum):
    """kohya's three ways of saying what an image is about."""

    CLASS_TOKENS = "dreambooth_class_tokens"  # every image captioned "<identifier> <class>"
    CAPTIONS = "dreambooth_captions"  # a caption file beside each image
    FINE_TUNING = "fine_tuning"  # captions and tags from a metadata JSON


KOHYA_CAPTION_EXTENSION = ".caption"  # sd-scripts' default for --caption_extension


@dataclass(frozen=True, kw_only=True)
class KohyaSubset:
    """One ``[[datasets.subsets]]`` with every inherited value resolved.

    ``caption_extension`` is None when no level set it (kohya then reads ``.caption`` files,
    see :attr:`effective_caption_extension`); ``class_tokens`` is kohya's caption for images
    without a caption file.
    """

    image_dir: str | None = None
    metadata_file: str | None = None
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str | None = None
    num_repeats: int = 1
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    caption_separator: str = ","
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    enable_wildcard: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    alpha_mask: bool = False
    cache_info: bool = False
    custom_attributes: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    # key -> the dotted path its value came from (the subset, its dataset or [general]), so a
    # rule about an inherited value names the line the user wrote
    sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False,
                                       compare=False)

    @property
    def mode(self) -> SubsetMode:
        """Fine-tuning with a metadata file; captions when an extension is configured (class
        tokens then caption only the images without a file); class tokens alone otherwise.
        A subset with neither reads kohya's default ``.caption`` files, so it is CAPTIONS."""
        if self.metadata_file is not None:
            return SubsetMode.FINE_TUNING
        if self.caption_extension is None and self.class_tokens is not None:
            return SubsetMode.CLASS_TOKENS
        return SubsetMode.CAPTIONS

    @property
    def effective_caption_extension(self) -> str:
        return self.caption_extension or KOHYA_CAPTION_EXTENSION


@dataclass(frozen=True, kw_only=True)
class KohyaDataset:
    """One ``[[datasets]]``: the batching and bucketing its subsets share.

    ``resolution`` is ``(width, height)``, or None when the config leaves it to the trainer's
    ``--resolution`` (as Loomis's own exported configs do).
    """

    subsets: tuple[KohyaSubset, ...]
    resolution: tuple[int, int] | None = None
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_seed: int | None = None
    validation_split: float = 0.0
    sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False,
                                       compare=False)

    @property
    def is_fine_tuning(self) -> bool:
        return any(s.mode is SubsetMode.FINE_TUNING for s in self.subsets)

    def buckets(self) -> list[tuple[int, int]]:
        """The predefined buckets kohya trains this dataset at.

        Without bucketing that is the resolution alone; with ``bucket_no_upscale`` kohya derives
        each image's bucket from its own size instead, so there is no fixed list (empty).
        """
        if self.resolution is None:
            raise ValueError("the dataset has no resolution; pass the trainer's --resolution as defaults")
        if not self.enable_bucket:
            return [self.resolution]
        if self.bucket_no_upscale:
            return []
        return make_buckets(resolution=self.resolution, min_reso=self.min_bucket_reso,
                            max_reso=self.max_bucket_reso, steps=self.bucket_reso_steps)


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """A whole kohya dataset config file; kohya trains on the concatenation of its datasets."""

    datasets: tuple[KohyaDataset, ...]


# ---------------------------------------------------------------------------------------------
# Key schema: which key may appear at which level, and how its value is checked

_Check = Callable[[object, str], Any]


def _type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"must be true or false, not {_type_name(value)}", field=path)
    return value


def _int(minimum: int | None = None, maximum: int | None = None, *, multiple: int = 1) -> _Check:
    def check(value: object, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"must be an integer, not {_type_name(value)}", field=path)
        if minimum is not None and value < minimum:
            raise ConfigError(f"must be at least {minimum}, got {value}", field=path)
        if maximum is not None and value > maximum:
            raise ConfigError(f"must be at most {maximum}, got {value}", field=path)
        if value % multiple:
            raise ConfigError(f"must be a multiple of {multiple}, got {value}", field=path)
        return value
    return check


def _number(low: float | None = None, high: float | None = None, *, high_open: bool = False) -> _Check:
    def check(value: object, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"must be a number, not {_type_name(value)}", field=path)
        number = float(value)
        if not math.isfinite(number):
            raise ConfigError(f"must be a finite number, got {value}", field=path)
        if (low is not None and number < low) or (
                high is not None and (number >= high if high_open else number > high)):
            bound = f"at least {low}" if high is None else f"in [{low}, {high}{')' if high_open else ']'}"
            raise ConfigError(f"must be {bound}, got {value}", field=path)
        return number
    return check


def _str(*, nonempty: bool = False) -> _Check:
    def check(value: object, path: str) -> str:
        if not isinstance(value, str):
            raise ConfigError(f"must be a string, not {_type_name(value)}", field=path)
        if nonempty and not value.strip():
            raise ConfigError("must not be empty", field=path)
        return value
    return check


def _caption_extension(value: object, path: str) -> str:
    text: str = _str(nonempty=True)(value, path)
    if not text.startswith("."):
        # kohya appends it to the stem verbatim: "txt" would look for "imgtxt"
        raise ConfigError(f"must start with a dot (kohya appends it to the file stem): {'.' + text!r}?",
                          field=path)
    return text


def _resolution(value: object, path: str) -> tuple[int, int]:
    side_check = _int(MIN_RESOLUTION, MAX_RESOLUTION, multiple=RESOLUTION_MULTIPLE)
    if isinstance(value, list) and len(value) == 2:
        width, height = (side_check(v, f"{path}.{i}") for i, v in enumerate(value))
        return width, height
    if isinstance(value, list):
        raise ConfigError(f"must be one integer or [width, height], got {len(value)} values", field=path)
    side = side_check(value, path)
    return side, side


def _crop_range(value: object, path: str) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) != 2:
        raise ConfigError("must be [low, high]", field=path)
    low, high = (_number(0.0)(v, f"{path}.{i}") for i, v in enumerate(value))
    if low > high:
        raise ConfigError(f"low {low} is above high {high}", field=path)
    return low, high


def _table(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"must be a table, not {_type_name(value)}", field=path)
    return MappingProxyType(dict(value))


# Dataset-wide keys: [general] or [[datasets]].
_DATASET_KEYS: dict[str, _Check] = {
    "resolution": _resolution,
    "batch_size": _int(1),
    "enable_bucket": _bool,
    "min_bucket_reso": _int(MIN_RESOLUTION, MAX_RESOLUTION),
    "max_bucket_reso": _int(MIN_RESOLUTION, MAX_RESOLUTION),
    "bucket_reso_steps": _int(RESOLUTION_MULTIPLE, MAX_BUCKET_RESO_STEPS, multiple=RESOLUTION_MULTIPLE),
    "bucket_no_upscale": _bool,
    "network_multiplier": _number(),
    "validation_seed": _int(0),
    "validation_split": _number(0.0, 1.0, high_open=True),
}
# Subset keys that [general] and [[datasets]] may set for all their subsets.
_INHERITED_SUBSET_KEYS: dict[str, _Check] = {
    "class_tokens": _str(nonempty=True),
    "caption_extension": _caption_extension,
    "num_repeats": _int(1),
    "shuffle_caption": _bool,
    "keep_tokens": _int(0),
    "keep_tokens_separator": _str(),
    "secondary_separator": _str(),
    "caption_separator": _str(nonempty=True),
    "caption_prefix": _str(),
    "caption_suffix": _str(),
    "enable_wildcard": _bool,
    "color_aug": _bool,
    "flip_aug": _bool,
    "random_crop": _bool,
    "face_crop_aug_range": _crop_range,
    "caption_dropout_rate": _number(0.0, 1.0),
    "caption_dropout_every_n_epochs": _int(0),
    "caption_tag_dropout_rate": _number(0.0, 1.0),
    "token_warmup_min": _int(1),
    "token_warmup_step": _number(0.0),
    "alpha_mask": _bool,
    "cache_info": _bool,
    "custom_attributes": _table,
}
# Keys that only make sense on one subset.
_SUBSET_ONLY_KEYS: dict[str, _Check] = {
    "image_dir": _str(nonempty=True),
    "metadata_file": _str(nonempty=True),
    "is_reg": _bool,
}
_GENERAL_KEYS = {**_DATASET_KEYS, **_INHERITED_SUBSET_KEYS}
_SUBSET_KEYS = {**_INHERITED_SUBSET_KEYS, **_SUBSET_ONLY_KEYS}
_ALL_KEYS = {*_GENERAL_KEYS, *_SUBSET_ONLY_KEYS, "subsets"}
# Only DreamBooth subsets have these; a fine-tuning subset that inherits them ignores them.
_DREAMBOOTH_ONLY = ("class_tokens", "caption_extension", "is_reg")

_TABLE_KEYS = {"general": "table", "datasets": "array", "subsets": "array"}
_Layer = dict[str, tuple[Any, str]]  # key -> (checked value, dotted path it came from)


def _unknown_key(key: str, path: str, *, allowed: Sequence[str], table: str,
                 value: object = None) -> ConfigError:
    if key in _ALL_KEYS:
        home = ("[[datasets.subsets]]" if key in _SUBSET_ONLY_KEYS
                else "[general] or [[datasets]]" if key in _DATASET_KEYS else "[[datasets]]")
        return ConfigError(f"{key!r} cannot be set in {table}; it belongs in {home}", field=path)
    close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.6)
    if not close:
        # a mistyped or translated table name ([generale], [[datasets.sottoinsiemi]]) is still a table
        shape = ("table" if isinstance(value, dict)
                 else "array" if isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
                 else None)
        close = [k for k, k_shape in _TABLE_KEYS.items() if k in allowed and k_shape == shape]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown key {key!r} in {table}{hint}", field=path)


def _layer(table: Mapping[str, Any], prefix: str, schema: Mapping[str, _Check], *, name: str,
           skip: Sequence[str] = ()) -> _Layer:
    layer: _Layer = {}
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if key in skip:
            continue
        check = schema.get(key)
        if check is None:
            raise _unknown_key(key, path, allowed=[*schema, *skip], table=name, value=value)
        layer[key] = (check(value, path), path)
    return layer


def _tables(value: object, path: str, *, name: str) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"must be an array of tables, written [[{name}]]", field=path)
    if not value:
        raise ConfigError(f"needs at least one [[{name}]]", field=path)
    return value


def parse_dataset_config(text: str, *, defaults: Mapping[str, object] | None = None) -> DatasetConfig:
    """Read a kohya ``--dataset_config`` TOML the way sd-scripts would, refusing what it would
    refuse or misread.

    ``defaults`` plays the part of the trainer's command-line arguments (``resolution``,
    ``batch_size``, ``caption_extension``, ...; config-file names), the last fallback before
    kohya's own defaults. Raises :class:`ConfigError` naming the dotted path of the bad value.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", field="") from exc
    for key in document:
        if key not in ("general", "datasets"):
            raise _unknown_key(key, key, allowed=["general", "datasets"], table="the top level",
                               value=document[key])
    base = _layer(defaults or {}, "defaults", _GENERAL_KEYS, name="defaults")
    general = _layer(_table(document.get("general", {}), "general"), "general", _GENERAL_KEYS,
                     name="[general]")
    if "datasets" not in document:
        raise ConfigError("no [[datasets]] table; kohya needs at least one", field="datasets")
    datasets = _tables(document["datasets"], "datasets", name="datasets")
    return DatasetConfig(datasets=tuple(
        _dataset({**base, **general}, table, f"datasets.{index}") for index, table in enumerate(datasets)
    ))


def _dataset(inherited: _Layer, table: Mapping[str, Any], path: str) -> KohyaDataset:
    own = _layer(table, path, _GENERAL_KEYS, name="[[datasets]]", skip=("subsets",))
    if "subsets" not in table:
        raise ConfigError("no [[datasets.subsets]]; every dataset needs at least one",
                          field=f"{path}.subsets")
    merged = {**inherited, **own}
    subsets = tuple(
        _subset(merged, subset, f"{path}.subsets.{index}")
        for index, subset in enumerate(_tables(table["subsets"], f"{path}.subsets", name="datasets.subsets"))
    )
    fine_tuning = [s.mode is SubsetMode.FINE_TUNING for s in subsets]
    if any(fine_tuning) and not all(fine_tuning):
        index = fine_tuning.index(not fine_tuning[0])
        raise ConfigError(
            "a dataset is either fine-tuning (every subset has metadata_file) or DreamBooth (none has);"
            " put these subsets in separate [[datasets]]",
            field=f"{path}.subsets.{index}" + (".metadata_file" if fine_tuning[index] else ""),
        )
    own_keys = {k: v for k, v in merged.items() if k in _DATASET_KEYS}
    dataset = KohyaDataset(subsets=subsets, **{k: v for k, (v, _) in own_keys.items()},
                           sources=MappingProxyType({k: p for k, (_, p) in own_keys.items()}))
    _check_bucketing(dataset, merged)
    return dataset


def _check_bucketing(dataset: KohyaDataset, merged: _Layer) -> None:
    problems = bucketing_problems(
        resolution=dataset.resolution, enable_bucket=dataset.enable_bucket,
        min_bucket_reso=dataset.min_bucket_reso, max_bucket_reso=dataset.max_bucket_reso,
        bucket_reso_steps=dataset.bucket_reso_steps, bucket_no_upscale=dataset.bucket_no_upscale)
    if problems:
        key, message = problems[0]
        raise ConfigError(message, field=merged[key][1] if key in merged else key)


def _subset(inherited: _Layer, table: Mapping[str, Any], path: str) -> KohyaSubset:
    own = _layer(table, path, _SUBSET_KEYS, name="[[datasets.subsets]]")
    if "metadata_file" in own:
        for key in _DREAMBOOTH_ONLY:
            if key in own:
                raise ConfigError(f"{key!r} is a DreamBooth setting; a subset with metadata_file is"
                                  " fine-tuning, whose captions come from the metadata", field=own[key][1])
        inherited = {k: v for k, v in inherited.items() if k not in _DREAMBOOTH_ONLY}
    elif "image_dir" not in own:
        raise ConfigError("a subset needs image_dir (or metadata_file for fine-tuning)",
                          field=f"{path}.image_dir")
    merged = {**inherited, **own}
    return KohyaSubset(**{k: v for k, (v, _) in merged.items() if k in _SUBSET_KEYS},
                       sources=MappingProxyType({k: p for k, (_, p) in merged.items() if k in _SUBSET_KEYS}))


# ---------------------------------------------------------------------------------------------
# Folder names

# A date-stamped folder such as "20240101_holiday" must not become twenty million repeats.
MAX_REPEATS = 1000
_SUBSET_RE = re.compile(r"^(\d{1,9})_(.+)$", re.DOTALL)
_REG_PARENT_RE = re.compile(r"^(reg|regs|regulari[sz]ation)([ _-].*)?$", re.IGNORECASE)
_TRAIN_PARENT_RE = re.compile(r"^(img|imgs|image|images|train|training)([ _-].*)?$", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class SubsetName:
    """What a kohya folder name means: ``10_sks dog`` trains "sks dog" ten times per epoch.

    ``kind_from_parent`` says whether ``is_reg`` came from the parent folder's name (``reg``,
    ``img``, ...) rather than from the guess that a name without a space is a class alone.
    """

    folder: str
    repeats: int
    identifier: str | None
    class_token: str | None
    is_reg: bool
    kind_from_parent: bool = False

    @property
    def class_tokens(self) -> str | None:
        """kohya's ``class_tokens``: the words it uses as the caption of uncaptioned images."""
        return join_class_tokens(self.identifier, self.class_token)


def parse_subset_dir(name: str) -> SubsetName | None:
    """Read a kohya subset folder name (or a relative folder path ending in one).

    ``<repeats>_<identifier> <class>`` is a training subset and ``<repeats>_<class>`` a
    regularisation one, the convention kohya's docs teach. The space is only a guess at which
    is which, so a parent folder named like ``reg``/``reg_data``/``regularization`` or
    ``img``/``train``/``train_data`` overrides it: kohya itself tells them apart by the parent
    (``--reg_data_dir`` versus ``--train_data_dir``). None when the name is not a subset.
    """
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        return None
    folder = parts[-1]
    match = _SUBSET_RE.match(folder)
    if match is None:
        return None
    repeats = int(match.group(1))
    tokens = match.group(2).split()
    if not 1 <= repeats <= MAX_REPEATS or not tokens:
        return None
    parent = parts[-2] if len(parts) > 1 else ""
    if _REG_PARENT_RE.match(parent):
        is_reg, from_parent = True, True
    elif _TRAIN_PARENT_RE.match(parent):
        is_reg, from_parent = False, True
    else:
        is_reg, from_parent = len(tokens) == 1, False
    if is_reg:  # kohya's reg folders carry the class only
        return SubsetName(folder=folder, repeats=repeats, identifier=None, class_token=" ".join(tokens),
                          is_reg=True, kind_from_parent=from_parent)
    return SubsetName(folder=folder, repeats=repeats, identifier=tokens[0],
                      class_token=" ".join(tokens[1:]) or None, is_reg=False,
                      kind_from_parent=from_parent)


def join_class_tokens(identifier: str | None, class_token: str | None) -> str | None:
    joined = " ".join(t for t in (identifier, class_token) if t)
    return joined or None


def subset_from_folder(folder: str, *, image_dir: str | None = None) -> KohyaSubset:
    """A DreamBooth subset from a kohya folder name (``10_sks dog``), as ``--train_data_dir`` /
    ``--reg_data_dir`` read them; the naming rules are :func:`parse_subset_dir`'s."""
    parsed = parse_subset_dir(folder)
    if parsed is None:
        raise ConfigError("not a kohya subset folder name (<repeats>_<identifier> <class>)", field=folder)
    return KohyaSubset(image_dir=image_dir if image_dir is not None else folder, num_repeats=parsed.repeats,
                       class_tokens=parsed.class_tokens, is_reg=parsed.is_reg)


# ---------------------------------------------------------------------------------------------
# Buckets

def make_buckets(*, resolution: tuple[int, int], min_reso: int = 256, max_reso: int = 1024,
                 steps: int = 64) -> list[tuple[int, int]]:
    """kohya's ``make_bucket_resolutions``: ``(width, height)`` buckets of at most the
    resolution's area, sorted.

    The square bucket is ``floor(sqrt(area) / steps) * steps`` on a side. Then for each width
    from ``min_reso`` to ``max_reso`` in ``steps``, the height is the largest multiple of
    ``steps`` with ``width * height <= area``, capped at ``max_reso``; when that height is at
    least ``min_reso`` both ``(width, height)`` and ``(height, width)`` are buckets.
    """
    if steps < 1 or min_reso < 1 or min_reso > max_reso:
        raise ValueError(f"bad bucket bounds: min {min_reso}, max {max_reso}, steps {steps}")
    if min(resolution) < steps:
        raise ValueError(f"resolution {resolution} is below one bucket step ({steps})")
    max_area = resolution[0] * resolution[1]
    side = math.isqrt(max_area) // steps * steps
    buckets = {(side, side)}
    for width in range(min_reso, max_reso + 1, steps):
        height = min(max_reso, max_area // width // steps * steps)
        if height >= min_reso:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


"""Writing a stored dataset back out as a kohya-layout zip that reproduces what trains."""

from __future__ import annotations

import io
import json
import posixpath
import zipfile
from dataclasses import dataclass, field

from services.gateway.datasets.ingest import DRIVE_RE, IMAGE_EXTENSIONS, SubsetInfo, one_line, unique_path

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so the same dataset always exports the same bytes


@dataclass(frozen=True, kw_only=True)
class ExportItem:
    """One stored image as it goes into a kohya-layout archive."""

    subset: str
    filename: str
    data: bytes = field(repr=False)
    caption: str | None = None
    tags: list[str] = field(default_factory=list)


def metadata_key(subset: SubsetInfo, filename: str) -> str:
    """The image's key in ``metadata.json``: its path relative to ``img/``, without extension.

    kohya's merge scripts write either the bare stem (the default) or the path as given on
    the command line *with* its extension (``--full_path``). A bare stem is ambiguous once
    there are several subset folders, and a full path only works from one machine's layout.
    kohya's fine-tuning loader resolves a key that is not an existing file by globbing
    ``<image_dir>/<key>.<image extension>`` (and ``<image_dir>/<key>.npz`` for cached
    latents), so with ``image_dir = "img"`` this key finds the image on any machine and stays
    unique across subsets.
    """
    return f"{subset.folder}/{posixpath.splitext(filename)[0]}"


def export_zip(
    *, items: list[ExportItem], subsets: list[SubsetInfo], caption_extension: str = ".caption",
    metadata: dict[str, dict[str, str]] | None = None, write_tags_in_captions: bool = False,
) -> bytes:
    """Write a dataset as kohya sd-scripts expects it, so it trains there unchanged.

    ``img/<repeats>_<identifier> <class>/`` holds training subsets, ``reg/<repeats>_<class>/``
    regularisation ones, each image with a caption file beside it when it has a caption (or,
    lacking one, its tags comma-joined; ``write_tags_in_captions`` appends tags to captions
    too). ``dataset_config.toml`` describes the DreamBooth-style subsets; ``metadata.json`` is
    the fine-tuning metadata for the training images (see :func:`metadata_key`), and
    ``metadata`` is merged over the generated entries field by field (the caller's win).
    Stems that would share a caption file within a folder are made unique (``a_2.jpg``).
    Raises ``ValueError`` for inconsistent arguments: those are the caller's bugs, not the user's.
    """
    if not caption_extension.startswith(".") or caption_extension.lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"{caption_extension!r} cannot be a caption extension")
    by_name: dict[str, SubsetInfo] = {}
    folders: dict[str, str] = {}
    for subset in subsets:
        if subset.name in by_name:
            raise ValueError(f"subset {subset.name!r} is listed twice")
        by_name[subset.name] = subset
        directory = f"{'reg' if subset.is_reg else 'img'}/{_export_component(subset.folder)}"
        if directory in folders.values():
            raise ValueError(f"subsets {subset.name!r} and another both export to {directory!r}")
        folders[subset.name] = directory

    files: list[tuple[str, bytes, int]] = []
    entries: dict[str, dict[str, str]] = {}
    training_keys: set[str] = set()
    stems: dict[str, set[str]] = {}
    used: set[str] = set()
    for item in items:
        if item.subset not in by_name:
            raise ValueError(f"item {item.filename!r} names an unknown subset {item.subset!r}")
        subset = by_name[item.subset]
        used.add(subset.name)
        path = unique_path(f"{folders[subset.name]}/{_export_component(item.filename)}",
                            stems.setdefault(subset.name, set()), set())
        filename = posixpath.basename(path)
        files.append((path, item.data, zipfile.ZIP_STORED))  # images are compressed already
        tags = ", ".join(one_line(t) for t in item.tags if t.strip())
        caption = one_line(item.caption or "")
        text = caption or tags
        if write_tags_in_captions and caption and tags:
            text = f"{caption}, {tags}"
        if text:
            caption_path = posixpath.splitext(path)[0] + caption_extension
            files.append((caption_path, text.encode("utf-8"), zipfile.ZIP_DEFLATED))
        if subset.is_reg:
            continue  # kohya's fine-tuning has no regularisation images
        key = metadata_key(subset, filename)
        training_keys.add(key)
        if caption or tags:
            entry: dict[str, str] = {}
            if caption:
                entry["caption"] = caption
            if tags:
                entry["tags"] = tags
            entries[key] = entry
    for key, extra in (metadata or {}).items():
        if key not in training_keys:
            raise ValueError(f"metadata key {key!r} names no exported training image")
        entries.setdefault(key, {}).update(extra)

    files.append(("metadata.json", (json.dumps(entries, indent=2, ensure_ascii=False) + "\n").encode(),
                  zipfile.ZIP_DEFLATED))
    config = _dataset_config([(s, folders[s.name]) for s in subsets if s.name in used], caption_extension)
    files.append(("dataset_config.toml", config.encode(), zipfile.ZIP_DEFLATED))

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data, compression in files:
            info = zipfile.ZipInfo(path, date_time=_ZIP_DATE)
            info.compress_type = compression
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def _export_component(name: str) -> str:
    """A single, safe path component, or a ValueError: stored names were checked on the way in,
    so anything else here is a bug that must not become a path outside the archive's folders."""
    if not name or "/" in name or "\\" in name or name.rstrip(" .") == "" or DRIVE_RE.match(name) \
            or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise ValueError(f"{name!r} is not a safe file or folder name")
    return name


def _dataset_config(subsets: list[tuple[SubsetInfo, str]], caption_extension: str) -> str:
    """kohya's dataset config: ``[general]``, one ``[[datasets]]``, a ``[[datasets.subsets]]`` each.

    Resolution and batch size belong to the training run, so they are left to the trainer's
    arguments (kohya falls back to them when the config does not say).
    """
    lines = [
        "# kohya sd-scripts dataset config, written by Loomis.",
        "# image_dir paths are relative: run the trainer from the folder this archive was extracted",
        "# into, or make them absolute. For fine-tuning, use instead one subset with",
        '#   image_dir = "img" and metadata_file = "metadata.json"',
        "# (its keys are image paths relative to img/, without extension).",
        "",
        "[general]",
        "enable_bucket = true",
        "",
        "[[datasets]]",
    ]
    for subset, directory in subsets:
        lines += ["", "  [[datasets.subsets]]", f"  image_dir = {_toml_string(directory)}",
                  f"  num_repeats = {subset.repeats}"]
        if subset.class_tokens:
            lines.append(f"  class_tokens = {_toml_string(subset.class_tokens)}")
        lines += [f"  is_reg = {'true' if subset.is_reg else 'false'}",
                  f"  caption_extension = {_toml_string(caption_extension)}"]
    return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    """A TOML basic string (json.dumps is close but writes surrogate pairs, which TOML forbids)."""
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


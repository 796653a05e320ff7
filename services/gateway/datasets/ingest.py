"""Checking a dataset upload of training images before anything is stored.

Pure functions over bytes (Pillow and the standard library only), so the gateway can check a
whole upload before anything is stored, in the layout kohya sd-scripts users already know:
``img/<repeats>_<identifier> <class>/`` folders, caption files beside the images,
``reg/<repeats>_<class>/`` for regularisation images, a dataset config TOML and a fine-tuning
``metadata.json``.

Uploads are hostile until proven otherwise: every zip entry's name, type, flags and declared
sizes are checked before a byte is decompressed, the bytes actually read are counted as well
(headers can lie), and every image goes through :func:`services.gateway.images.decode_image`, which
refuses decompression bombs from the header alone.

One file although it is over 500 lines: the zip checks, the multipart checks and the pairing
of images with captions share one byte budget and one classification of paths, and together
they are the security boundary for uploads; reading it in one place is how it gets reviewed.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import stat
import tomllib
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from services.gateway.datasets.kohya import SubsetName, join_class_tokens, parse_subset_dir
from services.gateway.images import MAX_INPUT_BYTES, decode_image
from shared.errors import ValidationFailed
from shared.text import find_control_character

# Pillow format name -> the name we store; GIF and TIFF decode_image would take, but kohya's
# loaders and most training tools do not expect them in a dataset.
# MPO is a JPEG with extra pictures (phones' depth/gain maps); its file is still a plain JPEG.
IMAGE_FORMATS: dict[str, str] = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "BMP": "bmp"}
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
DEFAULT_SUBSET = "default"
# Below this size an entry cannot be a meaningful bomb (the totals bound it anyway), and small
# text files legitimately compress far better than images.
_RATIO_CHECK_FLOOR = 256 * 1024
_READ_CHUNK = 64 * 1024

DRIVE_RE = re.compile(r"^[A-Za-z]:")
_NEWLINES_RE = re.compile(r"\s*[\r\n]+\s*")
_SYSTEM_FILES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})


@dataclass(frozen=True, kw_only=True)
class SubsetInfo:
    """A subset as stored with a dataset: how often kohya repeats it and what it is called."""

    name: str
    repeats: int = 1
    identifier: str | None = None
    class_token: str | None = None
    is_reg: bool = False

    @property
    def class_tokens(self) -> str | None:
        return join_class_tokens(self.identifier, self.class_token)

    @property
    def folder(self) -> str:
        """The kohya folder name (``10_sks dog``); a subset without tokens keeps its own name,
        because a ``<repeats>_`` name would make kohya's folder mode caption it with that word."""
        tokens = self.class_tokens
        return f"{self.repeats}_{tokens}" if tokens else self.name


def _subset_info(parsed: SubsetName) -> SubsetInfo:
    return SubsetInfo(name=parsed.folder, repeats=parsed.repeats, identifier=parsed.identifier,
                      class_token=parsed.class_token, is_reg=parsed.is_reg)


# ---------------------------------------------------------------------------------------------
# Ingest


@dataclass(frozen=True, kw_only=True)
class IngestLimits:
    """Bounds on one upload, so a hostile archive costs at most this much memory and time."""

    max_files: int = 10_000
    max_file_bytes: int = MAX_INPUT_BYTES
    max_total_bytes: int = 512 * 1024 * 1024
    max_ratio: float = 100.0
    min_side: int = 512  # the training resolution: smaller images are flagged, not refused


# An uploaded file or archive: its bytes, or a seekable file holding them.
Upload = bytes | BinaryIO


@dataclass(frozen=True, kw_only=True)
class IngestedItem:
    """One accepted image. The original bytes are kept: re-encoding would change what trains.

    They are read from the upload again when asked for (``load``), so an upload's images are
    never all in memory at once.
    """

    path: str  # posix, relative to the dataset root; unique, and its stem unique in its subset
    subset: str
    filename: str
    sha256: str  # of ``data``
    load: Callable[[], bytes] = field(repr=False, compare=False)
    format: str  # "png", "jpeg", "webp" or "bmp", from the content, not the extension
    width: int  # after EXIF orientation, i.e. as the user sees it
    height: int
    caption: str | None
    flags: tuple[str, ...] = ()
    caption_file: str | None = None  # the extension of the caption file read (kohya reads one)

    @property
    def data(self) -> bytes:
        return self.load()


@dataclass(frozen=True, kw_only=True)
class IgnoredEntry:
    """Something in an upload that is harmless but not part of the dataset, and why."""

    source: str  # the zip's filename, or "files"
    path: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class IngestResult:
    """A complete, checked dataset upload; the caller stores it, nothing has been written yet."""

    items: list[IngestedItem]
    subsets: list[SubsetInfo]  # those with at least one item: training first, then by name
    duplicates: list[tuple[str, str]]  # (kept_path, dropped_path), same sha256
    ignored: list[IgnoredEntry]
    renamed: list[tuple[str, str]]  # (original_path, stored_path) where names clashed
    config_toml: str | None = None
    config_field: str | None = None  # how errors name the kept config: "zip:<path>" or "files[i]"
    metadata: dict[str, Any] | None = None


@dataclass
class _Entry:
    field: str  # how errors name it: "files[3]" or "zip:img/10_sks dog/a.png"
    source: str
    path: str
    load: Callable[[], bytes]

    @property
    def data(self) -> bytes:
        """Read (or decompress) now: entries are read one at a time, never all at once."""
        return self.load()


@dataclass
class _Budget:
    limits: IngestLimits
    files: int = 0
    declared: int = 0
    read: int = 0


@dataclass
class _Candidate:
    entry: _Entry
    caption: str | None
    caption_file: str | None = None


def _fail(field_name: str, message: str, *, status: int = 422) -> ValidationFailed:
    error = ValidationFailed([{"field": field_name, "message": message}])
    error.status = status
    return error


def ingest(
    *, files: list[tuple[str, Upload]], zips: list[tuple[str, Upload]],
    caption_extensions: tuple[str, ...] = (".caption", ".txt"), limits: IngestLimits = IngestLimits(),
) -> IngestResult:
    """Check an upload of training images completely and return it, or raise without a trace.

    ``files`` are multipart uploads (images and caption files; a filename may carry a relative
    path such as ``10_sks dog/a.png``), ``zips`` are archives in any layout, kohya's included;
    each is bytes or a seekable file, which must stay open while the result is used.
    The first error raises ``ValidationFailed`` naming the file (``files[i]``, ``zip`` or
    ``zip:<path>``): 413 for anything too big, 422 for anything unsafe or unreadable. Nothing
    is written, so a refused upload leaves nothing half-stored.
    """
    for ext in caption_extensions:
        if not ext.startswith(".") or ext.lower() in IMAGE_EXTENSIONS:
            raise ValueError(f"{ext!r} cannot be a caption extension")
    budget = _Budget(limits)
    ignored: list[IgnoredEntry] = []
    configs: list[_Entry] = []
    metadatas: list[_Entry] = []
    candidates: list[_Candidate] = []

    if files:
        entries = [_multipart_entry(i, name, data, budget=budget) for i, (name, data) in enumerate(files)]
        for entry in entries:
            if isinstance(_classify(entry.path, caption_extensions), _Ignore):
                raise _fail(entry.field, f"{entry.path!r} is neither an image (PNG, JPEG, WebP, BMP) "
                            f"nor a caption file ({', '.join(caption_extensions)})")
        candidates += _pair(entries, caption_extensions, ignored, configs, metadatas)
    for name, data in zips:
        entries = _zip_entries(name, data, caption_extensions, budget=budget, ignored=ignored)
        candidates += _pair(entries, caption_extensions, ignored, configs, metadatas)
    if not candidates:
        raise _fail("zip" if zips and not files else "files", "the upload holds no images")

    config_toml, config_field = _first_config(configs, ignored)
    metadata = _first_metadata(metadatas, ignored)
    items, subsets, duplicates, renamed = _build_items(candidates, limits)
    return IngestResult(items=items, subsets=subsets, duplicates=duplicates, ignored=ignored,
                        renamed=renamed, config_toml=config_toml, config_field=config_field,
                        metadata=metadata)


def _safe_path(raw: str, *, field_name: str) -> str:
    """A relative posix path, or a refusal: no ``..``, no absolute or drive paths, no controls.

    Components made only of dots and spaces are refused too: Windows trims trailing dots and
    spaces, so ``.. `` would climb out of the folder there when a user extracts an export.
    """
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in raw):
        raise _fail(field_name, f"the path {raw!r} contains control characters")
    name = raw.replace("\\", "/")
    if name.startswith("/") or DRIVE_RE.match(name):
        raise _fail(field_name, f"the path {raw!r} is absolute; only relative paths are accepted")
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part.rstrip(" .") == "":
            raise _fail(field_name, f"the path {raw!r} leaves its folder ({part!r} is not allowed)")
        parts.append(part)
    if not parts:
        raise _fail(field_name, f"the path {raw!r} names no file")
    return "/".join(parts)


def _upload_size(upload: Upload) -> int:
    if isinstance(upload, bytes):
        return len(upload)
    return upload.seek(0, io.SEEK_END)


def _reader(upload: Upload) -> Callable[[], bytes]:
    if isinstance(upload, bytes):
        return lambda: upload

    def read() -> bytes:
        upload.seek(0)
        return upload.read()

    return read


def _multipart_entry(index: int, filename: str, data: Upload, *, budget: _Budget) -> _Entry:
    field_name = f"files[{index}]"
    path = _safe_path(filename, field_name=field_name)
    limits = budget.limits
    budget.files += 1
    if budget.files > limits.max_files:
        raise _fail(field_name, f"more than {limits.max_files} files in one upload", status=413)
    size = _upload_size(data)
    if size > limits.max_file_bytes:
        raise _fail(field_name, f"{size} bytes; the limit per file is {limits.max_file_bytes}",
                    status=413)
    budget.declared += size
    budget.read += size
    if budget.declared > limits.max_total_bytes:
        raise _fail(field_name, f"the upload exceeds {limits.max_total_bytes} bytes in all", status=413)
    return _Entry(field=field_name, source="files", path=path, load=_reader(data))


def _zip_entries(
    name: str, data: Upload, caption_extensions: tuple[str, ...], *, budget: _Budget,
    ignored: list[IgnoredEntry],
) -> list[_Entry]:
    """Every entry is checked from the central directory before any is decompressed.

    The archive stays open (it owns no file of its own) so entries are decompressed when they
    are used, and again when they are stored.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise _fail("zip", f"{name!r} is not a readable zip archive") from exc
    wanted = _check_zip(archive, name, caption_extensions, budget=budget, ignored=ignored)
    return [_Entry(field=f"zip:{info.filename}", source=name, path=path,
                   load=_ZipMember(archive, info, name, budget)) for info, path in wanted]


@dataclass
class _ZipMember:
    """Decompresses one entry on demand; its bytes count towards the upload's total once."""

    archive: zipfile.ZipFile
    info: zipfile.ZipInfo
    name: str
    budget: _Budget | None

    def __call__(self) -> bytes:
        data = _read_entry(self.archive, self.info, self.name, budget=self.budget)
        self.budget = None
        return data


def _check_zip(
    archive: zipfile.ZipFile, name: str, caption_extensions: tuple[str, ...], *, budget: _Budget,
    ignored: list[IgnoredEntry],
) -> list[tuple[zipfile.ZipInfo, str]]:
    """Refuse the archive from its central directory alone; return the entries worth reading."""
    limits = budget.limits
    wanted: list[tuple[zipfile.ZipInfo, str]] = []
    for info in archive.infolist():
        field_name = f"zip:{info.filename}"
        if stat.S_ISLNK(info.external_attr >> 16):
            raise _fail(field_name, f"{info.filename!r} in {name!r} is a symbolic link")
        if info.is_dir():
            if info.filename.replace("\\", "/").strip("/") not in ("", "."):  # "./" is harmless
                _safe_path(info.filename, field_name=field_name)
            continue
        path = _safe_path(info.filename, field_name=field_name)
        if info.flag_bits & 0x1:
            raise _fail(field_name, f"{info.filename!r} in {name!r} is encrypted")
        budget.files += 1
        if budget.files > limits.max_files:
            raise _fail("zip", f"{name!r} brings the upload over {limits.max_files} files", status=413)
        if info.file_size > limits.max_file_bytes:
            raise _fail(field_name, f"{info.file_size} bytes uncompressed; the limit per file is "
                        f"{limits.max_file_bytes}", status=413)
        if info.file_size > _RATIO_CHECK_FLOOR and \
                info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise _fail(field_name, f"compressed {info.file_size / max(info.compress_size, 1):.0f}:1; "
                        f"more than {limits.max_ratio:g}:1 looks like a zip bomb", status=413)
        budget.declared += info.file_size
        if budget.declared > limits.max_total_bytes:
            raise _fail("zip", f"{name!r} would unpack to more than {limits.max_total_bytes} bytes "
                        "in all", status=413)
        kind = _classify(path, caption_extensions)
        if isinstance(kind, _Ignore):
            ignored.append(IgnoredEntry(source=name, path=path, reason=kind.reason))
        else:
            wanted.append((info, path))
    return wanted


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, *,
                budget: _Budget | None) -> bytes:
    """Decompress one entry, counting what comes out rather than trusting the header (towards
    the upload's total unless ``budget`` is None: a second read of the same entry)."""
    field_name = f"zip:{info.filename}"
    chunks: list[bytes] = []
    size = 0
    try:
        with archive.open(info) as stream:
            while chunk := stream.read(_READ_CHUNK):
                size += len(chunk)
                # _check_zip held file_size to the per-file limit, so this bounds both.
                if size > info.file_size:
                    raise _fail(field_name, f"{info.filename!r} in {name!r} holds more data than its "
                                f"header declares ({info.file_size} bytes)", status=413)
                if budget is not None:
                    budget.read += len(chunk)
                    if budget.read > budget.limits.max_total_bytes:
                        raise _fail("zip", "the upload unpacks to more than "
                                    f"{budget.limits.max_total_bytes} bytes in all", status=413)
                chunks.append(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError,
            RuntimeError) as exc:
        # zipfile stops at the declared size and then fails the CRC: a lying header ends here.
        raise _fail(field_name, f"{info.filename!r} in {name!r} cannot be read: {exc}") from exc
    if size != info.file_size:
        raise _fail(field_name, f"{info.filename!r} in {name!r} holds {size} bytes, not the "
                    f"{info.file_size} its header declares")
    return b"".join(chunks)


@dataclass(frozen=True)
class _Ignore:
    reason: str


_IMAGE, _CAPTION, _CONFIG, _METADATA = "image", "caption", "config", "metadata"


def _classify(path: str, caption_extensions: tuple[str, ...]) -> str | _Ignore:
    parts = path.split("/")
    base = parts[-1]
    lower = base.lower()
    if parts[0] == "__MACOSX":
        return _Ignore("macOS archive metadata (__MACOSX)")
    if base.startswith("._"):
        return _Ignore("macOS resource fork (._ file)")
    if lower in _SYSTEM_FILES:
        return _Ignore("operating-system file")
    if any(part.startswith(".") for part in parts[:-1]):
        return _Ignore("inside a hidden folder")
    if base.startswith("."):
        return _Ignore("hidden file")
    ext = posixpath.splitext(lower)[1]
    if ext in IMAGE_EXTENSIONS:
        return _IMAGE
    if _caption_extension(base, caption_extensions) is not None:
        return _CAPTION
    if ext == ".toml":
        return _CONFIG
    if ext == ".json" and lower.startswith("meta"):
        return _METADATA
    if ext == ".zip":
        return _Ignore("nested archives are not expanded; upload them separately")
    return _Ignore("not an image (PNG, JPEG, WebP, BMP), caption file or dataset config")


def _caption_extension(base: str, caption_extensions: tuple[str, ...]) -> str | None:
    """The caption extension ``base`` ends with (longest first, so ``.flux.txt`` beats ``.txt``)."""
    lower = base.lower()
    for ext in sorted(caption_extensions, key=len, reverse=True):
        if lower.endswith(ext.lower()) and len(base) > len(ext):
            return ext
    return None


def _pair(
    entries: list[_Entry], caption_extensions: tuple[str, ...], ignored: list[IgnoredEntry],
    configs: list[_Entry], metadatas: list[_Entry],
) -> list[_Candidate]:
    """Attach ``name.caption`` to ``name.png`` in the same folder, as kohya does (``with_suffix``).

    When several caption files fit, the first of ``caption_extensions`` wins. A caption is
    decoded only when an image uses it, so a stray README.txt in another encoding is harmless.
    """
    images: list[_Entry] = []
    captions: dict[tuple[str, str], dict[str, _Entry]] = {}
    for entry in entries:
        kind = _classify(entry.path, caption_extensions)
        if kind == _IMAGE:
            images.append(entry)
        elif kind == _CAPTION:
            folder, base = posixpath.split(entry.path)
            ext = _caption_extension(base, caption_extensions)
            assert ext is not None
            captions.setdefault((folder, base[: -len(ext)]), {}).setdefault(ext, entry)
        elif kind == _CONFIG:
            configs.append(entry)
        elif kind == _METADATA:
            metadatas.append(entry)
    used: set[int] = set()
    image_stems: set[tuple[str, str]] = set()
    candidates: list[_Candidate] = []
    for image in images:
        folder, base = posixpath.split(image.path)
        key = (folder, posixpath.splitext(base)[0])
        image_stems.add(key)
        found = captions.get(key, {})
        chosen = next((found[ext] for ext in caption_extensions if ext in found), None)
        text = None
        chosen_ext = next((ext for ext in caption_extensions if ext in found), None)
        if chosen is not None:
            used.add(id(chosen))
            text = _read_caption(chosen)
        candidates.append(_Candidate(entry=image, caption=text,
                                     caption_file=chosen_ext if text is not None else None))
    for key, by_ext in captions.items():
        for caption in by_ext.values():
            if id(caption) not in used:
                reason = ("another caption file for the same image was used" if key in image_stems
                          else "caption file with no image beside it")
                ignored.append(IgnoredEntry(source=caption.source, path=caption.path, reason=reason))
    return candidates


def _read_caption(entry: _Entry) -> str | None:
    """kohya reads one line of UTF-8; a BOM from Notepad is tolerated, line breaks become spaces."""
    try:
        text = entry.data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _fail(entry.field, f"the caption {entry.path!r} is not valid UTF-8 "
                    f"(byte {exc.start})") from exc
    _refuse_control_characters(entry, text, what="the caption")
    return one_line(text) or None


def _refuse_control_characters(entry: _Entry, value: Any, *, what: str) -> None:
    """A NUL (or another control character) in a text file would fail the database write
    later; the file is named instead. Tabs and line breaks are ordinary layout."""
    hit = find_control_character(value, multiline=True)
    if hit is not None:
        loc, found = hit
        where = f" (in {'.'.join(map(str, loc))!r})" if loc else ""
        raise _fail(entry.field, f"{what} {entry.path!r} contains a control character "
                    f"({found}{where})")


def one_line(text: str) -> str:
    return _NEWLINES_RE.sub(" ", text).strip()


def _first_config(configs: list[_Entry], ignored: list[IgnoredEntry]) -> tuple[str | None, str | None]:
    """Keep the first dataset config, and how errors name it, for the trainer to read later.

    One that is not TOML is refused rather than skipped: the user meant it to shape training,
    and a dataset that silently trains without it is the worse surprise.
    """
    kept: tuple[str | None, str | None] = (None, None)
    for entry in configs:
        if kept[0] is not None:
            ignored.append(IgnoredEntry(source=entry.source, path=entry.path,
                                        reason="another dataset config was kept"))
            continue
        try:
            text = entry.data.decode("utf-8-sig")
            _refuse_control_characters(entry, text, what="the dataset config")
            _refuse_control_characters(entry, tomllib.loads(text), what="the dataset config")
        except UnicodeDecodeError as exc:
            raise _fail(entry.field, f"the dataset config {entry.path!r} is not UTF-8 text") from exc
        except tomllib.TOMLDecodeError as exc:
            raise _fail(entry.field, f"the dataset config {entry.path!r} is not valid TOML: {exc}") from exc
        kept = (text, entry.field)
    return kept


def _first_metadata(metadatas: list[_Entry], ignored: list[IgnoredEntry]) -> dict[str, Any] | None:
    """Keep the first kohya metadata file that is a JSON object of per-image objects."""
    kept: dict[str, Any] | None = None
    for entry in metadatas:
        reason = "another metadata file was kept"
        if kept is None:
            try:
                text = entry.data.decode("utf-8-sig")
                _refuse_control_characters(entry, text, what="the metadata file")
                value = json.loads(text)
            except (UnicodeDecodeError, ValueError) as exc:
                reason = f"not valid JSON: {exc}"
            else:
                if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
                    _refuse_control_characters(entry, value, what="the metadata file")
                    kept = value
                    continue
                reason = "not kohya metadata (a JSON object of per-image objects)"
        ignored.append(IgnoredEntry(source=entry.source, path=entry.path, reason=reason))
    return kept


def _build_items(
    candidates: list[_Candidate], limits: IngestLimits,
) -> tuple[list[IngestedItem], list[SubsetInfo], list[tuple[str, str]], list[tuple[str, str]]]:
    seen: dict[str, int] = {}  # sha256 -> index in kept
    kept: list[tuple[_Candidate, str, SubsetName | None, tuple[str, int, int]]] = []
    dropped: list[tuple[int, str]] = []  # (index in kept, dropped path)
    for candidate in candidates:
        entry = candidate.entry
        data = entry.data
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:  # identical bytes are not decoded twice
            index = seen[digest]
            first = kept[index]
            dropped.append((index, entry.path))
            if first[0].caption is None and candidate.caption is not None:
                kept[index] = (_Candidate(entry=first[0].entry, caption=candidate.caption,
                                          caption_file=candidate.caption_file), *first[1:])
            continue
        # Only the checks are wanted (header pixel count, full decode, format): the original
        # bytes are what gets stored. A 1-bit conversion makes decode_image's PNG re-encode of
        # the result about 12x cheaper than RGB for a 6 MP photo (0.25 s against 3 s).
        checked = decode_image(data, field=entry.field, mode="1")
        fmt = IMAGE_FORMATS.get(checked.source_format)
        if fmt is None:
            raise _fail(entry.field, f"{checked.source_format} images are not accepted in a dataset; "
                        "send PNG, JPEG, WebP or BMP")
        width, height = checked.size
        seen[digest] = len(kept)
        folder = posixpath.dirname(entry.path)
        kept.append((candidate, digest, parse_subset_dir(folder) if folder else None, (fmt, width, height)))

    subsets = _resolve_subsets([(c.entry, parsed) for c, _, parsed, _ in kept])
    items: list[IngestedItem] = []
    renamed: list[tuple[str, str]] = []
    stems: dict[str, set[str]] = {}
    paths: set[str] = set()
    for candidate, digest, parsed, (fmt, width, height) in kept:
        subset = parsed.folder if parsed else DEFAULT_SUBSET
        path = unique_path(candidate.entry.path, stems.setdefault(subset, set()), paths)
        if path != candidate.entry.path:
            renamed.append((candidate.entry.path, path))
        flags = ("small",) if min(width, height) < limits.min_side else ()
        items.append(IngestedItem(
            path=path, subset=subset, filename=posixpath.basename(path), sha256=digest,
            load=candidate.entry.load, format=fmt, width=width, height=height,
            caption=candidate.caption, flags=flags, caption_file=candidate.caption_file,
        ))
    ordered = sorted(subsets.values(), key=lambda s: (s.is_reg, s.name))
    duplicates = [(items[index].path, path) for index, path in dropped]
    return items, ordered, duplicates, renamed


def _resolve_subsets(images: list[tuple[_Entry, SubsetName | None]]) -> dict[str, SubsetInfo]:
    """One SubsetInfo per folder name; a name used for both kinds is refused, not guessed at.

    An upload of only guessed regularisation folders (``10_ohwx`` with no ``img``/``reg``
    parent) is a training set whose folders carry no class: nobody trains on regularisation
    images alone, so those become training subsets.
    """
    subsets: dict[str, SubsetInfo] = {}
    guesses: dict[str, SubsetName] = {}
    for entry, parsed in images:
        if parsed is None:
            subsets.setdefault(DEFAULT_SUBSET, SubsetInfo(name=DEFAULT_SUBSET))
            continue
        info = _subset_info(parsed)
        existing = subsets.setdefault(parsed.folder, info)
        if existing.is_reg != info.is_reg:
            raise _fail(entry.field, f"the folder {parsed.folder!r} is used both for training and for "
                        "regularisation images; rename one of them")
        if parsed.is_reg and not parsed.kind_from_parent:
            guesses[parsed.folder] = parsed
    if subsets and all(s.is_reg for s in subsets.values()) and set(guesses) == set(subsets):
        for folder, parsed in guesses.items():
            tokens = (parsed.class_token or "").split()
            subsets[folder] = SubsetInfo(name=folder, repeats=parsed.repeats, identifier=tokens[0],
                                         class_token=" ".join(tokens[1:]) or None)
    return subsets


def unique_path(path: str, stems: set[str], paths: set[str]) -> str:
    """Keep each stem unique (case-insensitively) within a subset: kohya pairs captions by stem,
    and a case-insensitive file system would merge ``A.png`` and ``a.png`` when extracting."""
    folder, base = posixpath.split(path)
    stem, ext = posixpath.splitext(base)
    candidate, counter = stem, 1
    while candidate.casefold() in stems or posixpath.join(folder, candidate + ext) in paths:
        counter += 1
        candidate = f"{stem}_{counter}"
    stems.add(candidate.casefold())
    result = posixpath.join(folder, candidate + ext)
    paths.add(result)
    return result


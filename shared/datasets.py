"""Training-image datasets: checking uploads, summarising them, and writing them back out for kohya.

Pure functions over bytes (Pillow and the standard library only), so the gateway can check a
whole upload before anything is stored, and the trainer reads back exactly the layout that
kohya sd-scripts users already know: ``img/<repeats>_<identifier> <class>/`` folders, caption
files beside the images, ``reg/<repeats>_<class>/`` for regularisation images, a dataset config
TOML and a fine-tuning ``metadata.json``.

Uploads are hostile until proven otherwise: every zip entry's name, type, flags and declared
sizes are checked before a byte is decompressed, the bytes actually read are counted as well
(headers can lie), and every image goes through :func:`shared.images.decode_image`, which
refuses decompression bombs from the header alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import stat
import statistics
import tomllib
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypedDict

from shared.errors import ValidationFailed
from shared.images import MAX_INPUT_BYTES, decode_image
from shared.text import find_control_character

# Pillow format name -> the name we store; GIF and TIFF decode_image would take, but kohya's
# loaders and most training tools do not expect them in a dataset.
# MPO is a JPEG with extra pictures (phones' depth/gain maps); its file is still a plain JPEG.
IMAGE_FORMATS: dict[str, str] = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "BMP": "bmp"}
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
DEFAULT_SUBSET = "default"
# A date-stamped folder such as "20240101_holiday" must not become twenty million repeats.
MAX_REPEATS = 1000
# Below this size an entry cannot be a meaningful bomb (the totals bound it anyway), and small
# text files legitimately compress far better than images.
_RATIO_CHECK_FLOOR = 256 * 1024
_READ_CHUNK = 64 * 1024
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so the same dataset always exports the same bytes

_SUBSET_RE = re.compile(r"^(\d{1,9})_(.+)$", re.DOTALL)
_REG_PARENT_RE = re.compile(r"^(reg|regs|regulari[sz]ation)([ _-].*)?$", re.IGNORECASE)
_TRAIN_PARENT_RE = re.compile(r"^(img|imgs|image|images|train|training)([ _-].*)?$", re.IGNORECASE)
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_NEWLINES_RE = re.compile(r"\s*[\r\n]+\s*")
_SYSTEM_FILES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
_ASPECT_BUCKETS: tuple[tuple[str, float], ...] = (
    ("1:1", 1.0), ("4:3", 4 / 3), ("3:4", 3 / 4), ("3:2", 3 / 2), ("2:3", 2 / 3),
    ("16:9", 16 / 9), ("9:16", 9 / 16),
)
ASPECT_TOLERANCE = 0.05
TOP_TAGS = 50


# ---------------------------------------------------------------------------------------------
# Subsets


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
        return _join_tokens(self.identifier, self.class_token)


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
        return _join_tokens(self.identifier, self.class_token)

    @property
    def folder(self) -> str:
        """The kohya folder name (``10_sks dog``); a subset without tokens keeps its own name,
        because a ``<repeats>_`` name would make kohya's folder mode caption it with that word."""
        tokens = self.class_tokens
        return f"{self.repeats}_{tokens}" if tokens else self.name


def _join_tokens(identifier: str | None, class_token: str | None) -> str | None:
    joined = " ".join(t for t in (identifier, class_token) if t)
    return joined or None


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
    if name.startswith("/") or _DRIVE_RE.match(name):
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
    return _one_line(text) or None


def _refuse_control_characters(entry: _Entry, value: Any, *, what: str) -> None:
    """A NUL (or another control character) in a text file would fail the database write
    later; the file is named instead. Tabs and line breaks are ordinary layout."""
    hit = find_control_character(value, multiline=True)
    if hit is not None:
        loc, found = hit
        where = f" (in {'.'.join(map(str, loc))!r})" if loc else ""
        raise _fail(entry.field, f"{what} {entry.path!r} contains a control character "
                    f"({found}{where})")


def _one_line(text: str) -> str:
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
        path = _unique_path(candidate.entry.path, stems.setdefault(subset, set()), paths)
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


def _unique_path(path: str, stems: set[str], paths: set[str]) -> str:
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


# ---------------------------------------------------------------------------------------------
# Report


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


# ---------------------------------------------------------------------------------------------
# Export


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
        path = _unique_path(f"{folders[subset.name]}/{_export_component(item.filename)}",
                            stems.setdefault(subset.name, set()), set())
        filename = posixpath.basename(path)
        files.append((path, item.data, zipfile.ZIP_STORED))  # images are compressed already
        tags = ", ".join(_one_line(t) for t in item.tags if t.strip())
        caption = _one_line(item.caption or "")
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
    if not name or "/" in name or "\\" in name or name.rstrip(" .") == "" or _DRIVE_RE.match(name) \
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

"""Multipart uploads read as a stream: after authentication, within a limit, onto disk.

FastAPI parses ``File``/``Form`` parameters before any dependency runs, so a route declaring
them reads (and spools) a whole body before it knows who sent it or whether it is too large.
Upload routes take the raw request instead: their dependencies (the API key) run first, a
``Content-Length`` over the limit is refused before a byte is read, and the bytes are counted
as they arrive for bodies sent chunked. Every file part goes into one temporary file per
request, so neither a 2 GiB LoRA nor ten thousand dataset images are held in memory (nor take
a file descriptor each), and each part is read back as a seekable view of that file.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError as PydanticValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from shared.errors import BadRequest, ValidationFailed
from shared.text import RequestModel

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

# Boundaries, part headers and text fields around the files; a body may exceed the files'
# limit by this much.
FORM_OVERHEAD_BYTES = 64 * 1024
# A text field holds a name or an option, never data.
MAX_FIELD_BYTES = 16 * 1024
# File bytes gathered before one write to disk, off the event loop: the per-request buffer.
_FLUSH_BYTES = 1024 * 1024
_READ_BUFFER = 256 * 1024

# Bound to RequestModel so every form model refuses control characters like JSON bodies do.
ModelT = TypeVar("ModelT", bound=RequestModel)


def multipart_body(properties: dict[str, Any], *, required: list[str]) -> dict[str, Any]:
    """``openapi_extra`` that documents a multipart body the route parses itself.

    File properties are ``{"type": "string", "format": "binary"}`` (arrays of them for several
    files), as FastAPI would have generated for ``UploadFile`` parameters.
    """
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": properties, "required": required}}}}}


def binary(description: str) -> dict[str, Any]:
    return {"type": "string", "format": "binary", "description": description}


def parse_fields(model: type[ModelT], form: MultipartForm, *,
                 files: tuple[str, ...] = (), file_fields: tuple[str, ...] | None = None
                 ) -> ModelT:
    """Validate the text fields with ``model`` and check the file fields named in ``files``
    are present; errors read as FastAPI's own for form parameters (``errors[].field``).

    Nothing sent is dropped unread: a text field sent twice, or as a file (``curl -F
    overrides=@options.json``), is an error naming it, where the first value alone (or none)
    would have been used; with ``file_fields``, so is a file under any other name."""
    as_files = [name for name in form.files if name in model.model_fields]
    errors: list[dict[str, Any]] = []
    try:
        fields = model.model_validate(form.values())
    except PydanticValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])}
                  for error in exc.errors(include_url=False, include_context=False)
                  if not (error["type"] == "missing" and error["loc"][0] in as_files)]
    errors += [{"type": "missing", "loc": ("body", name), "msg": "Field required"}
               for name in files if not form.files_of(name)]
    errors += [{"type": "text_expected", "loc": ("body", name),
                "msg": "sent as a file; send it as a text field (curl -F 'name=value', or "
                       "-F 'name=<file' for a file's contents)"} for name in as_files]
    errors += [{"type": "repeated", "loc": ("body", name),
                "msg": f"sent {len(values)} times; send it once"}
               for name, values in form.fields.items()
               if name in model.model_fields and len(values) > 1]
    if file_fields is not None:
        errors += [{"type": "unexpected_file", "loc": ("body", name),
                    "msg": f"not a file field here; files go in {' or '.join(file_fields)}"}
                   for name in form.files if name not in file_fields
                   and name not in model.model_fields]
    if errors:
        raise RequestValidationError(errors)
    return fields


def too_large(field_name: str, message: str) -> ValidationFailed:
    error = ValidationFailed([{"field": field_name, "message": message}])
    error.status, error.code, error.title = 413, "payload_too_large", "Payload too large"
    return error


class _Section(io.RawIOBase):
    """Bytes ``[start, start + size)`` of a file, read with ``pread`` so that several views of
    one file can be read at once without sharing a file position."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        super().__init__()
        self._fd, self._start, self._size, self._pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        wanted = max(0, min(len(view), self._size - self._pos))
        if wanted == 0:
            return 0
        data = os.pread(self._fd, wanted, self._start + self._pos)
        view[:len(data)] = data
        self._pos += len(data)
        return len(data)


@dataclass(frozen=True)
class FilePart:
    """One uploaded file: where it lies in the request's spool file."""

    name: str
    filename: str
    content_type: str
    offset: int
    size: int
    spool: BinaryIO = field(repr=False)

    def open(self) -> BinaryIO:
        """A seekable, read-only file of this part alone (for zipfile, Pillow, hashing)."""
        return io.BufferedReader(_Section(self.spool.fileno(), self.offset, self.size),
                                 buffer_size=_READ_BUFFER)

    async def read(self) -> bytes:
        """The whole part; only for parts whose size was checked against a small limit."""
        with self.open() as file:
            return await asyncio.to_thread(file.read)


@dataclass
class MultipartForm:
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, list[FilePart]] = field(default_factory=dict)

    def files_of(self, name: str) -> list[FilePart]:
        return self.files.get(name, [])

    def values(self) -> dict[str, str]:
        """Each text field's first value, for validation by a model."""
        return {name: values[0] for name, values in self.fields.items() if values}


@dataclass
class _Part:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    name: str = ""
    filename: str | None = None
    content_type: str = ""
    offset: int = 0
    size: int = 0
    text: bytearray = field(default_factory=bytearray)


class _Collector:
    """python-multipart's callbacks: text fields into memory, file data into the spool."""

    def __init__(self, spool: BinaryIO, *, max_files: int, max_fields: int,
                 file_field: str) -> None:
        self.spool, self.max_files, self.max_fields = spool, max_files, max_fields
        self.file_field = file_field
        self.form = MultipartForm()
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.position = 0  # bytes of file data written or pending
        self.ended = False
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._files = 0
        self._fields = 0

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_header_field": self._header_field,
            "on_header_value": self._header_value_data, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._part.headers.append((bytes(self._header_name).lower(), bytes(self._header_value)))
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        part = self._part
        headers = dict(part.headers)
        _, options = parse_options_header(headers.get(b"content-disposition"))
        if b"name" not in options:
            raise BadRequest("a multipart part has no Content-Disposition name",
                             code="malformed_multipart")
        part.name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            self._files += 1
            if self._files > self.max_files:
                raise too_large(self.file_field, f"more than {self.max_files} files in one upload")
            part.filename = options[b"filename"].decode("utf-8", "replace")
            part.content_type = headers.get(b"content-type", b"").decode("latin-1")
            part.offset = self.position
        else:
            self._fields += 1
            if self._fields > self.max_fields:
                raise BadRequest(f"more than {self.max_fields} form fields",
                                 code="malformed_multipart")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part.filename is None:
            if len(part.text) + end - start > MAX_FIELD_BYTES:
                raise too_large(part.name, f"a text field holds at most {MAX_FIELD_BYTES} bytes")
            part.text += data[start:end]
            return
        chunk = data[start:end]
        self.pending.append(chunk)
        self.pending_bytes += len(chunk)
        self.position += len(chunk)
        part.size += len(chunk)

    def _part_end(self) -> None:
        part = self._part
        if part.filename is None:
            self.form.fields.setdefault(part.name, []).append(part.text.decode("utf-8", "replace"))
        else:
            self.form.files.setdefault(part.name, []).append(FilePart(
                name=part.name, filename=part.filename, content_type=part.content_type,
                offset=part.offset, size=part.size, spool=self.spool))

    def _end(self) -> None:
        self.ended = True

    async def flush(self, *, force: bool = False) -> None:
        if self.pending and (force or self.pending_bytes >= _FLUSH_BYTES):
            data = b"".join(self.pending)
            self.pending.clear()
            self.pending_bytes = 0
            await asyncio.to_thread(self.spool.write, data)


def _declared_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    return int(raw) if raw is not None and raw.isdigit() else None


@contextlib.asynccontextmanager
async def read_multipart(
    request: Request, *, max_bytes: int, file_field: str, max_files: int = 1,
    max_fields: int = 16,
) -> AsyncIterator[MultipartForm]:
    """Parse the request's multipart body into text fields and spooled file parts.

    ``max_bytes`` bounds the whole body: a larger ``Content-Length`` is a 413 before anything
    is read, and so is a body that turns out larger while it streams. 413s name
    ``file_field``. The spool file is deleted when the context ends.
    """
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        # named as a JSON operation's 415 names it: every error body names its field
        error = BadRequest("This operation takes a multipart/form-data body (curl -F).",
                           code="unsupported_media_type", errors=[{
                               "field": "header.Content-Type", "type": "unsupported_media_type",
                               "message": "send the body as multipart/form-data with its "
                                          "boundary (curl -F)"}])
        error.status, error.title = 415, "Unsupported media type"
        raise error
    declared = _declared_length(request)
    if declared is not None and declared > max_bytes:
        raise too_large(file_field, f"the request is {declared} bytes; the limit is {max_bytes}")
    with tempfile.TemporaryFile(prefix="loomis-upload-") as spool:
        collector = _Collector(spool, max_files=max_files, max_fields=max_fields,
                               file_field=file_field)
        try:
            parser = MultipartParser(options[b"boundary"], collector.callbacks())
        except FormParserError as exc:
            raise BadRequest(f"malformed multipart body: {exc}",
                             code="malformed_multipart") from exc
        received = 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise too_large(file_field, f"the request is over the limit of {max_bytes} "
                                    "bytes")
                parser.write(chunk)
                await collector.flush()
        except FormParserError as exc:
            raise BadRequest(f"malformed multipart body: {exc}",
                             code="malformed_multipart") from exc
        except ClientDisconnect as exc:
            raise BadRequest("the client went away before the upload was complete",
                             code="upload_incomplete") from exc
        if not collector.ended:
            raise BadRequest("the multipart body ends before its closing boundary",
                             code="malformed_multipart")
        await collector.flush(force=True)
        await asyncio.to_thread(spool.flush)
        yield collector.form

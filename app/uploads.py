"""Multipart uploads streamed to storage in constant memory.

FastAPI's ``UploadFile`` spools the whole body before the endpoint runs;
:func:`receive_upload` instead feeds ``request.stream()`` to python-multipart's
streaming parser and writes the file part through a :class:`StorageWriter`
(hashing and enforcing the size cap as bytes arrive), so a 10 GB upload
never holds more than about :data:`FLUSH_BYTES` in memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio.to_thread
from fastapi import Request
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from app.errors import (
    MAX_ECHO_CHARS,
    FieldError,
    PayloadTooLarge,
    RequestTimeout,
    Unprocessable,
    UnsupportedMediaType,
    echo,
)
from app.storage import LocalStorage, StorageWriter

#: File bytes gathered before one write to disk (done in a worker thread).
FLUSH_BYTES = 1024 * 1024
#: Room for the multipart framing and small fields on top of the file's cap.
FRAMING_BYTES = 64 * 1024
#: Largest value accepted for a text field.
MAX_FIELD_BYTES = 1024
#: Largest header block of one part (its name, file name and content type).
MAX_PART_HEADER_BYTES = 16 * 1024


#: The OpenAPI request body of an upload endpoint (the body is parsed by hand).
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "name": {"type": "string", "maxLength": 255},
                    },
                }
            }
        },
    }
}


@dataclass
class Upload:
    """A received upload: its file (written, not yet committed) and its text fields."""

    file: StorageWriter
    filename: str | None
    fields: dict[str, str] = field(default_factory=dict)


def _missing_file(file_field: str) -> Unprocessable:
    return Unprocessable(
        f"the request has no file: send it as multipart/form-data field {file_field!r}",
        code="validation_error",
        errors=[FieldError(field=file_field, reason="field required")],
    )


def _header_text(raw: bytes) -> str:
    # Header bytes arrive as latin-1; browsers and curl put UTF-8 file names in them.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class _Receiver:
    """python-multipart callbacks that route the file part to a writer and keep text fields."""

    def __init__(self, writer: StorageWriter, file_field: str, text_fields: frozenset[str]) -> None:
        self.writer = writer
        self.file_field = file_field
        self.text_fields = text_fields
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self.pending = bytearray()
        self.received = 0
        self.seen_file = False
        self.ended = False
        self.error: Exception | None = None
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._header_size = 0
        self._part: str | None = None
        self._value = bytearray()

    def callbacks(self) -> dict[str, object]:
        """The callbacks to hand to :class:`MultipartParser`."""
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_bytes(self._header_name, d[s:e]),
            "on_header_value": lambda d, s, e: self._header_bytes(self._header_value, d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error

    def _part_begin(self) -> None:
        self._headers = {}
        self._header_size = 0
        self._part = None
        self._value = bytearray()

    def _header_bytes(self, into: bytearray, data: bytes) -> None:
        # The parser hands header bytes over as they come: keep them bounded.
        self._header_size += len(data)
        if self._header_size > MAX_PART_HEADER_BYTES:
            self._fail(
                Unprocessable(
                    f"a part's headers are longer than {MAX_PART_HEADER_BYTES} bytes",
                    code="malformed_multipart",
                )
            )
            return
        into.extend(data)

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).decode("latin-1").lower()] = bytes(
            self._header_value
        )
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition"))
        name = _header_text(options.get(b"name", b""))
        if name == self.file_field:
            if self.seen_file:
                self._fail(
                    Unprocessable(
                        f"send exactly one {self.file_field!r} part",
                        code="validation_error",
                        errors=[FieldError(field=self.file_field, reason="sent more than once")],
                    )
                )
            self.seen_file = True
            raw_name = options.get(b"filename")
            self.filename = _header_text(raw_name) if raw_name else None
        elif name not in self.text_fields:
            self._fail(
                Unprocessable(
                    f"unknown form field {echo(name)}",
                    code="validation_error",
                    errors=[FieldError(field=name[:MAX_ECHO_CHARS], reason="unknown field")],
                )
            )
        self._part = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.error is not None:
            return
        if self._part == self.file_field:
            self.received += end - start
            if self.received > self.writer.max_bytes:
                self._fail(_too_large(self.writer.max_bytes))
                return
            self.pending.extend(data[start:end])
        elif self._part is not None:
            self._value.extend(data[start:end])
            if len(self._value) > MAX_FIELD_BYTES:
                self._fail(
                    Unprocessable(
                        f"form field {self._part!r} is longer than {MAX_FIELD_BYTES} bytes",
                        code="validation_error",
                        errors=[FieldError(field=self._part, reason="too long")],
                    )
                )

    def _part_end(self) -> None:
        if self._part is not None and self._part != self.file_field:
            self.fields[self._part] = _header_text(bytes(self._value))
        self._part = None

    def _end(self) -> None:
        self.ended = True


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the upload is larger than the limit of {limit} bytes", code="upload_too_large"
    )


async def _drain(chunks: AsyncIterator[bytes], budget: int) -> None:
    """Read and drop up to ``budget`` more bytes of the body.

    A client that is still sending when the server answers 413 may see a reset
    instead of the answer; reading the rest (bounded, discarded) lets it see the
    problem document. Past the budget the connection is given up.
    """
    async for chunk in chunks:
        budget -= len(chunk)
        if budget < 0:
            return


async def receive_upload(
    request: Request,
    storage: LocalStorage,
    key: str,
    *,
    max_bytes: int,
    file_field: str = "file",
    text_fields: frozenset[str] = frozenset(),
    idle_timeout_s: float = 60.0,
) -> Upload:
    """Stream the request's multipart body: the ``file_field`` part into ``key``'s writer.

    Returns the :class:`Upload` with its writer finished but not committed; the
    caller commits it or aborts it (``with upload.file:`` aborts unless committed).
    Raises :class:`PayloadTooLarge` past ``max_bytes`` (with or without a
    Content-Length), :class:`Unprocessable` for a missing file, unknown field or
    malformed body, and :class:`UnsupportedMediaType` for a non-form body; in every
    case nothing is left in storage.
    """
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type in (b"", b"application/x-www-form-urlencoded"):
        raise _missing_file(file_field)
    if content_type != b"multipart/form-data":
        raise UnsupportedMediaType(
            "send the upload as multipart/form-data", code="multipart_required"
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise Unprocessable("the multipart body has no boundary", code="malformed_multipart")
    declared = request.headers.get("content-length", "")
    # More digits than 18 is more than any cap (and not worth parsing).
    if declared.isdigit() and (len(declared) > 18 or int(declared) > 2 * max_bytes + FRAMING_BYTES):
        # Too large to be worth draining: answer at once (clients that sent
        # Expect: 100-continue get this before sending a byte).
        raise _too_large(max_bytes)

    writer = storage.writer(key, max_bytes=max_bytes)
    try:
        receiver = _Receiver(writer, file_field, text_fields)
        await _parse(request, _parser_for(boundary, receiver), receiver, idle_timeout_s)
        data = bytes(receiver.pending)
        receiver.pending.clear()
        await anyio.to_thread.run_sync(writer.write, data)
        await anyio.to_thread.run_sync(writer.finish)
    except BaseException:
        # Includes the client going away mid-upload: no partial file stays behind.
        writer.abort()
        raise
    return Upload(writer, receiver.filename, receiver.fields)


def _parser_for(boundary: bytes, receiver: _Receiver) -> MultipartParser:
    """A streaming multipart parser that reports to ``receiver``."""
    return MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]


async def _next_chunk(chunks: AsyncIterator[bytes], idle_timeout_s: float) -> bytes | None:
    """The body's next chunk, None at its end; :class:`RequestTimeout` if it goes quiet."""
    try:
        with anyio.fail_after(idle_timeout_s):
            return await anext(chunks)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise RequestTimeout(
            f"the request body sent nothing for {idle_timeout_s:g} s", code="body_idle_timeout"
        ) from None


async def _parse(
    request: Request, parser: MultipartParser, receiver: _Receiver, idle_timeout_s: float
) -> None:
    file_field = receiver.file_field
    chunks = aiter(request.stream())
    while (chunk := await _next_chunk(chunks, idle_timeout_s)) is not None:
        try:
            parser.write(chunk)
        except FormParserError as exc:
            raise Unprocessable(
                f"malformed multipart body: {exc}", code="malformed_multipart"
            ) from None
        if receiver.error is not None:
            if isinstance(receiver.error, PayloadTooLarge):
                await _drain(chunks, receiver.writer.max_bytes)
            raise receiver.error
        if len(receiver.pending) >= FLUSH_BYTES:
            data = bytes(receiver.pending)
            receiver.pending.clear()
            await anyio.to_thread.run_sync(receiver.writer.write, data)
    if not receiver.ended:
        raise Unprocessable("the multipart body ends early", code="malformed_multipart")
    if not receiver.seen_file:
        raise _missing_file(file_field)

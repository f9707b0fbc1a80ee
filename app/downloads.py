"""Stored files as HTTP responses: ETag (the sha256), conditional GET, single ranges.

One function serves models, datasets and job artifacts the same way.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from app.display_names import display_name
from app.errors import NotFound, RangeNotSatisfiable, responses
from app.storage import LocalStorage

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
#: Positions with more digits than this lie past the end of any stored file; parsing
#: them whole would cost time (and Python refuses ints over 4,300 digits).
_MAX_POSITION_DIGITS = 18
_PAST_ANY_END = 10**_MAX_POSITION_DIGITS

#: The OpenAPI responses of a download endpoint.
CONTENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "the file"},
    206: {"content": {"application/octet-stream": {}}, "description": "one byte range"},
    304: {"description": "the client's copy (If-None-Match) is current"},
    **responses(NotFound, RangeNotSatisfiable),
}


def _etag_matches(header: str | None, etag: str) -> bool:
    if header is None:
        return False
    candidates = [c.strip().removeprefix("W/") for c in header.split(",")]
    return "*" in candidates or etag in candidates


def _position(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_POSITION_DIGITS else _PAST_ANY_END


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive ``(start, end)`` of a single ``bytes=`` range, or None for the whole file.

    Headers this server does not support (other units, several ranges) or that are
    malformed are ignored, as RFC 9110 allows; a well-formed range that lies wholly
    past the end raises :class:`RangeNotSatisfiable`.
    """
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        # A suffix: the last N bytes.
        length = _position(last)
        if length == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - length), size - 1
    start = _position(first)
    end = _position(last) if last else _PAST_ANY_END
    if end < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(size)
    return start, min(end, size - 1)


def content_disposition(filename: str) -> str:
    """An ``attachment`` header value that survives any file name (RFC 6266).

    Stored names may predate the upload's cleaning, so control characters are
    dropped here too (a line feed would make the whole response invalid).
    ``filename*`` carries the name in UTF-8, percent-encoded; ``filename`` is an
    ASCII fallback with every other character replaced by ``_``.
    """
    name = display_name(filename) or "download"
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def content_response(
    request: Request,
    storage: LocalStorage,
    key: str,
    *,
    sha256: str,
    size: int,
    filename: str,
    media_type: str = "application/octet-stream",
) -> Response:
    """The stored file ``key`` as a 200, 206 or 304 response."""
    etag = f'"{sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": content_disposition(filename),
    }
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers={"ETag": etag})
    byte_range = parse_range(request.headers.get("range"), size)
    if_range = request.headers.get("if-range")
    if byte_range is not None and if_range is not None and if_range.strip() != etag:
        # The client's copy is stale: it gets the whole current file.
        byte_range = None
    if byte_range is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(storage.read(key), media_type=media_type, headers=headers)
    start, end = byte_range
    headers["Content-Length"] = str(end - start + 1)
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(
        storage.read(key, start, end), status_code=206, media_type=media_type, headers=headers
    )

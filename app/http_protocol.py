"""uvicorn's HTTP protocol with a deadline and a size cap on each request's headers.

uvicorn times out idle keep-alive connections, but nothing bounds a request
whose headers arrive a byte at a time, or never end: each such connection
holds its socket, and its parser buffers whatever it is sent. Served with
``uvicorn --http app.http_protocol:BoundedHeadersProtocol`` (the Dockerfile,
compose and ``make serve`` do), a request's line and headers must be complete
within ``DISTILL_HEADER_TIMEOUT_S`` of its first byte (of the connection, for
the first request) and within ``DISTILL_MAX_HEADER_BYTES``; past either it is
answered 408 or 431 and the connection is closed. Bodies have their own idle
timeout (:mod:`app.uploads`).

A refusal closes the way web servers' "lingering close" does: the answer, then
end-of-stream, then whatever the client still sends is read and dropped until
the client ends its side or ``LINGER_S`` pass. A socket closed with bytes
unread, or with bytes still arriving, is answered with a reset, and the reset
can discard the answer before the client has read it: the client would see a
dropped connection where a 408 or 431 was sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import get_settings

LINGER_S = 2.0


def _response(status: str, message: str) -> bytes:
    body = message.encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class BoundedHeadersProtocol(HttpToolsProtocol):
    """httptools' protocol; each request's headers on a deadline and under a byte cap."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.header_timeout_s = settings.header_timeout_s
        self.max_header_bytes = settings.max_header_bytes
        self._awaiting_headers = False
        self._header_bytes = 0
        self._header_deadline: asyncio.TimerHandle | None = None
        #: Set once a refusal was sent: until it fires, the client's bytes are drained.
        self._linger_end: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        if self._linger_end is not None:
            self._linger_end.cancel()
            self._linger_end = None
        super().connection_lost(exc)

    def eof_received(self) -> None:
        if self._linger_end is not None:
            self.transport.close()  # the client is done sending: nothing left to drain
            return
        super().eof_received()

    def data_received(self, data: bytes) -> None:
        if self._linger_end is not None:
            return  # refused already: drained and dropped, never parsed
        super().data_received(data)
        # Still waiting after this chunk: all of it was request line and headers.
        if self._awaiting_headers:
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._refuse(
                    "431 Request Header Fields Too Large",
                    f"the request line and headers are over {self.max_header_bytes} bytes",
                )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._await_headers()

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._stop_clock()
        super().on_headers_complete()

    def _await_headers(self) -> None:
        self._awaiting_headers = True
        self._header_bytes = 0
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _stop_clock(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _too_slow(self) -> None:
        self._header_deadline = None
        if self._awaiting_headers:
            self._refuse(
                "408 Request Timeout",
                f"the request's headers did not arrive within {self.header_timeout_s:g} s",
            )

    def _refuse(self, status: str, message: str) -> None:
        self._awaiting_headers = False
        self._stop_clock()
        if self.transport.is_closing():
            return
        self.transport.write(_response(status, message))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._linger_end = self.loop.call_later(LINGER_S, self.transport.close)

"""Request headers on a deadline and under a cap, against a real uvicorn (app/http_protocol.py).

Slow or endless headers must not hold a connection for long: the server answers
408 once the headers take longer than ``DISTILL_HEADER_TIMEOUT_S`` (counted from
the connection, or from a kept-alive request's first byte, however steadily the
client trickles) and 431 past ``DISTILL_MAX_HEADER_BYTES``, while everyone else
is served.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.app.servers import Server, uvicorn_server

HEADER_TIMEOUT_S = 1.0
MAX_HEADER_BYTES = 8192


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("headers")
    env = {
        "DISTILL_DATABASE_URL": f"sqlite:///{folder / 'db.sqlite'}",
        "DISTILL_STORAGE_URL": f"file://{folder / 'artifacts'}",
        "DISTILL_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "DISTILL_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
    }
    with uvicorn_server(env, folder / "uvicorn.log") as running:
        yield running


def _connect(server: Server) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_a_connection_that_sends_nothing_is_answered_408_and_closed(server: Server) -> None:
    with _connect(server) as sock:
        started = time.monotonic()
        reply = _read_all(sock)
        took = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert HEADER_TIMEOUT_S * 0.8 <= took < HEADER_TIMEOUT_S + 3, took
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200


def test_headers_trickled_byte_by_byte_meet_the_deadline_not_an_idle_timer(
    server: Server,
) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        started = time.monotonic()
        reply = b""
        # A byte every 0.1 s: never idle for long, never done.
        while time.monotonic() - started < HEADER_TIMEOUT_S + 5:
            try:
                sock.sendall(b"x")
            except OSError:
                break
            sock.settimeout(0.1)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            reply += chunk
        took = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert took < HEADER_TIMEOUT_S + 3, took


def test_headers_over_the_cap_are_answered_431(server: Server) -> None:
    padding = b"".join(
        b"X-Padding-%d: %s\r\n" % (i, b"a" * 1000) for i in range(MAX_HEADER_BYTES // 1000 + 2)
    )
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n" + padding)
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]


def test_a_client_still_sending_when_refused_reads_the_answer_then_the_end(
    server: Server,
) -> None:
    # A megabyte of headers in one write: the server refuses after its first read, with
    # most of them still on their way. A socket closed with bytes unread answers with a
    # reset, which drops the 431 unread; the server drains them and ends the stream.
    padding = b"".join(b"X-Padding-%d: %s\r\n" % (i, b"a" * 1000) for i in range(1024))
    with _connect(server) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n" + padding)
        except OSError as error:  # a reset while writing: what the drain prevents
            pytest.fail(f"the connection was reset while the client wrote: {error!r}")
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert reply.endswith(b"bytes"), reply[-200:]


def test_requests_on_a_kept_alive_connection_and_bodies_are_not_counted(server: Server) -> None:
    with httpx.Client(base_url=server.base_url) as client:
        # Two requests on one connection, the second after more than the header timeout.
        assert client.get("/healthz").status_code == 200
        time.sleep(HEADER_TIMEOUT_S * 1.5)  # idle between requests is keep-alive's business
        assert client.get("/healthz").status_code == 200
        # A body many times the header cap, sent with the headers: not a 431.
        body = b"\0" * (16 * MAX_HEADER_BYTES)
        response = client.post("/v1/models", content=body, headers={"Authorization": "Bearer x"})
        assert response.status_code == 401, response.text

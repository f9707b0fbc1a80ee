"""A client that starts an upload and goes quiet is answered 408 and holds nothing after it."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import Tenants
from tests.app.servers import Server, half_sent_upload, uvicorn_server

pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)

IDLE_TIMEOUT_S = 1.0


@pytest.fixture
def server(database_url: str, tenants: Tenants, tmp_path: Path) -> Iterator[Server]:
    """uvicorn on the test's database, with a short idle-body timeout."""
    env = {
        "DISTILL_DATABASE_URL": database_url,
        "DISTILL_STORAGE_URL": f"file://{tmp_path / 'artifacts'}",
        "DISTILL_BODY_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
    }
    with uvicorn_server(env, tmp_path / "uvicorn.log") as running:
        yield running


def _reply(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or 30 s pass)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_a_quiet_upload_is_answered_408_and_leaves_nothing(
    server: Server, tenants: Tenants, tmp_path: Path
) -> None:
    started = time.monotonic()
    sock = half_sent_upload(server.base_url, tenants.acme["Authorization"], 100_000)
    try:
        reply = _reply(sock)
    finally:
        sock.close()
    waited = time.monotonic() - started
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), reply[:300]
    assert b"application/problem+json" in rest and b"body_idle_timeout" in rest
    assert IDLE_TIMEOUT_S <= waited < IDLE_TIMEOUT_S + 20
    with httpx.Client(base_url=server.base_url, headers=tenants.acme, timeout=10) as client:
        assert client.get("/v1/models").json()["data"] == []
    stored = [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
    assert stored == []

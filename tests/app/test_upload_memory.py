"""Uploads stream in constant memory: a 2 GiB chunked body to a 1 GiB cap costs the API < 64 MiB.

The service issue: "a 2 GB chunked upload without Content-Length to a server
capped at 1 GB gets 413 with the API process's memory growing by less than
64 MB". A real uvicorn serves the app; its resident set size is sampled while
the body streams in.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx
import psutil
import pytest
import sqlalchemy as sa

from app.storage import LocalStorage
from tests.app.conftest import Tenants
from tests.app.databases import count_rows
from tests.app.http import chunked_multipart
from tests.app.servers import uvicorn_server

MiB = 1024 * 1024
GiB = 1024 * MiB
CAP = 1 * GiB
BODY = 2 * GiB
MAX_GROWTH = 64 * MiB
#: Seconds any one socket operation may block before the client gives up on it.
IO_SECONDS = 60
BOUNDARY_HEADERS = {"Content-Type": "multipart/form-data; boundary=b0undary"}


@dataclass(frozen=True)
class RawResponse:
    """What the server answered, and whether it had read the whole body by then."""

    status: int
    content_type: str
    body: bytes
    sent_all: bool


def post_chunked(
    base_url: str, path: str, headers: dict[str, str], body: Iterable[bytes]
) -> RawResponse:
    """POST ``body`` with ``Transfer-Encoding: chunked`` over a raw socket and read the answer.

    httpx (like most clients) sends the whole body before it reads a response, and
    reports a write error, losing the response, if the server answers early and
    stops reading. Here the socket is checked for an answer before each chunk, and
    a broken pipe or a stalled write ends the sending, not the test; the response
    is then read from the same socket, so an early 413 is seen either way.
    """
    url = httpx.URL(base_url)
    host, port = url.host, url.port
    assert port is not None
    with socket.create_connection((host, port), timeout=IO_SECONDS) as sock:
        head = [
            f"POST {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Transfer-Encoding: chunked",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        sent_all = False
        try:
            for piece in body:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered (or closed): stop sending
                sock.sendall(b"%x\r\n" % len(piece))
                sock.sendall(piece)
                sock.sendall(b"\r\n")
            else:
                sock.sendall(b"0\r\n\r\n")
                sent_all = True
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the server stopped reading; its answer may already be waiting
        response = http.client.HTTPResponse(sock)
        response.begin()
        return RawResponse(
            response.status, response.getheader("content-type", ""), response.read(), sent_all
        )


class PeakRss:
    """Samples a process's resident set size in a background thread and keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self.samples = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# One database is enough for a test about the API process's memory; PostgreSQL
# is what production runs.
@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_2gib_chunked_upload_to_a_1gib_cap_gets_413_in_constant_memory(
    database_url: str, engine: sa.Engine, tenants: Tenants, tmp_path: Path
) -> None:
    storage_root = tmp_path / "artifacts"
    env = {
        "DISTILL_DATABASE_URL": database_url,
        "DISTILL_STORAGE_URL": f"file://{storage_root}",
        "DISTILL_MAX_UPLOAD_BYTES": str(CAP),
    }
    headers = {**tenants.acme, **BOUNDARY_HEADERS}
    with uvicorn_server(env, tmp_path / "uvicorn.log") as server:
        # Warm up every code path the big upload takes (auth, the database, the
        # multipart parser, the writer's threads, abort), so the baseline includes
        # what is imported or allocated once: a body that ends early is refused
        # after its 4 MiB were written and dropped.
        assert httpx.get(f"{server.base_url}/healthz").status_code == 200
        assert httpx.get(f"{server.base_url}/v1/models").status_code == 401
        early_end = list(chunked_multipart(4 * MiB, "warm.onnx", chunk=MiB))[:-1]
        warm = post_chunked(server.base_url, "/v1/models", headers, early_end)
        assert warm.status == 422, warm.body
        assert json.loads(warm.body)["code"] == "malformed_multipart"

        baseline = psutil.Process(server.process.pid).memory_info().rss
        started = time.perf_counter()
        with PeakRss(server.process.pid) as rss:
            response = post_chunked(
                server.base_url,
                "/v1/models",
                headers,
                chunked_multipart(BODY, "big.onnx", chunk=MiB),
            )
        seconds = time.perf_counter() - started
        log = (tmp_path / "uvicorn.log").read_text()

    growth = rss.peak - baseline
    print(
        f"\n2 GiB chunked upload to a 1 GiB cap: HTTP {response.status} in {seconds:.1f} s, "
        f"body {'fully' if response.sent_all else 'partly'} sent; API RSS baseline "
        f"{baseline / MiB:.1f} MiB, peak growth {growth / MiB:.1f} MiB "
        f"({rss.samples} samples)"
    )
    assert response.status == 413, (response.body, log)
    assert response.content_type.startswith("application/problem+json")
    assert json.loads(response.body)["code"] == "upload_too_large"
    assert growth < MAX_GROWTH, f"the API grew by {growth / MiB:.1f} MiB"
    assert count_rows(engine, "models") == 0
    assert LocalStorage(storage_root).files() == []
    incoming = storage_root / ".incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []

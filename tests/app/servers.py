"""A real uvicorn serving ``app.main:app`` in a subprocess on a loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.app.databases import REPO

#: How long uvicorn may take to import the app and answer its first request.
STARTUP_SECONDS = 30
#: How long uvicorn may take to shut down after SIGTERM before it is killed.
SHUTDOWN_SECONDS = 10


@dataclass(frozen=True)
class Server:
    """A running uvicorn: where to reach it and its process (for its pid, RSS, exit code)."""

    base_url: str
    process: subprocess.Popen


@contextmanager
def uvicorn_server(env_overrides: dict[str, str], log_path: Path) -> Iterator[Server]:
    """uvicorn serving ``app.main:app`` with ``env_overrides`` on top of this environment.

    Yields once ``/healthz`` answers 200 (fails the test with the log otherwise);
    stdout and stderr go to ``log_path``. The process is terminated on exit.
    """
    # The socket is bound and listening before uvicorn starts and is inherited by it:
    # no other process can take the port, and early connections wait in the backlog.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    env = {**os.environ, **env_overrides}
    with open(log_path, "wb") as log:
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "app.main:app", "--fd", str(sock.fileno())],
                cwd=REPO,
                env=env,
                pass_fds=[sock.fileno()],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            sock.close()
        server = Server(f"http://127.0.0.1:{port}", process)
        try:
            _wait_until_healthy(server, log_path)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=SHUTDOWN_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_healthy(server: Server, log_path: Path) -> None:
    # The first request waits in the listening socket's backlog until uvicorn
    # accepts it, so one request with a deadline is the whole wait.
    try:
        response = httpx.get(f"{server.base_url}/healthz", timeout=STARTUP_SECONDS)
    except httpx.TransportError as exc:
        code = server.process.poll()
        pytest.fail(f"uvicorn did not answer ({exc!r}, exit {code}):\n{log_path.read_text()}")
    assert response.status_code == 200, log_path.read_text()

"""A real uvicorn serving ``app.main:app`` in a subprocess on a loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    process: subprocess.Popen[bytes]


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
    # As app.devserver does: uvicorn leaves Nagle's algorithm on for the connections of an
    # inherited socket (~40 ms a keep-alive request); accepted sockets inherit this option.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    # A broker and work folder of the test's own unless it names others: never the repo's var/.
    own = {
        "DISTILL_BROKER_URL": f"filesystem://{log_path.parent / 'broker'}",
        "DISTILL_WORK_DIR": str(log_path.parent / "work"),
    }
    env = {**os.environ, **own, **env_overrides}
    with open(log_path, "wb") as log:
        try:
            process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "uvicorn", "app.main:app"),
                    *("--http", "app.http_protocol:BoundedHeadersProtocol"),
                    *("--fd", str(sock.fileno())),
                ],
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


#: The worker's entry point, as DESIGN.md names it.
CELERY_WORKER = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker"]
#: How long a Celery worker may take to connect to its broker and say it is ready.
WORKER_STARTUP_SECONDS = 60
#: How long a warm shutdown (finishing the running job) may take before the worker is killed.
WORKER_SHUTDOWN_SECONDS = 60


@contextmanager
def celery_worker(
    env_overrides: dict[str, str], log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A worker.celery_app worker``, as production runs it, with ``env_overrides``.

    Yields once the worker logs that it is ready; SIGTERM (a warm shutdown) on exit.
    """
    env = {**os.environ, **env_overrides}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*CELERY_WORKER, "--loglevel", "INFO", "--hostname", f"test-{os.getpid()}@%h"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_log(process, log_path, " ready.", WORKER_STARTUP_SECONDS)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=WORKER_SHUTDOWN_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for_log(
    process: subprocess.Popen[bytes], log_path: Path, text: str, deadline_s: float
) -> None:
    """Wait until ``text`` appears in the process's log; fail with the log if it exits first."""
    end = time.monotonic() + deadline_s
    while text not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > end:
            pytest.fail(
                f"no {text!r} from pid {process.pid} (exit {process.returncode}):\n"
                + log_path.read_text(errors="replace")
            )
        time.sleep(0.1)


def wait_until(condition: Callable[[], Any], what: str, deadline_s: float) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); fail at the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline_s:.0f} s waiting for {what}")
        time.sleep(0.1)


def half_sent_upload(base_url: str, authorization: str, content_length: int) -> socket.socket:
    """A connection that sends an upload's headers and 1 KiB of its body, then goes quiet."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    start = (
        b'--xx\r\nContent-Disposition: form-data; name="file"; filename="t.onnx"\r\n\r\n'
        + b"\0" * 1024
    )
    head = (
        "POST /v1/models HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Authorization: {authorization}\r\n"
        "Content-Type: multipart/form-data; boundary=xx\r\n"
        f"Content-Length: {content_length}\r\n\r\n"
    )
    sock.sendall(head.encode() + start)
    return sock

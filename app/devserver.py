"""The whole service on one machine: ``python -m app.devserver`` (what ``make serve`` runs).

Migrates the database, makes sure a development API key exists, then runs the API
(uvicorn), one Celery job worker and the control worker (beat, reconciler, webhooks)
as child processes on the environment's settings; the embedded defaults put SQLite,
the filesystem broker and the artifacts under ``var/`` in the working directory.
SIGINT (Ctrl-C) or SIGTERM stops them all; if one exits on its own, the others are
stopped too and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import http.client
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType

from alembic import command
from alembic.config import Config
from sqlalchemy.orm import Session

from app.auth.service import authenticate, create_api_key
from app.broker import CONTROL_QUEUE
from app.config import get_settings
from app.db import build_engine
from app.errors import Unauthorized

REPO = Path(__file__).resolve().parents[1]
#: The development key, kept between starts; relative to the working directory like ``var/``.
KEY_FILE = Path("var/dev-api-key")
#: The tenant the development key belongs to.
DEV_TENANT = "dev"
#: How long the API may take to answer ``/healthz`` after it is started.
STARTUP_SECONDS = 60
#: How long each child may take to stop after SIGTERM before it is killed.
STOP_SECONDS = 30
#: uvicorn's own limit on draining open connections (event streams never end by
#: themselves): below STOP_SECONDS, so it exits cleanly before it would be killed.
API_DRAIN_SECONDS = 20
_POLL_SECONDS = 0.2
#: The production entry points, run by this interpreter so they use the same environment.
API_COMMAND = [
    *(sys.executable, "-m", "uvicorn", "app.main:app"),
    *("--http", "app.http_protocol:BoundedHeadersProtocol"),
    *("--timeout-graceful-shutdown", str(API_DRAIN_SECONDS)),
]
WORKER_COMMAND = [
    *(sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker"),
    *("--loglevel", "INFO"),
]
#: The control worker with beat embedded: it runs the periodic reconciler and webhook
#: deliveries, never queued behind a job (production runs beat and it apart).
CONTROL_COMMAND = [
    *(sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker"),
    *("--queues", CONTROL_QUEUE, "--pool", "threads", "--concurrency", "2"),
    *("--beat", "--schedule", "var/celerybeat-schedule", "--loglevel", "INFO"),
    *("--hostname", "control@%h"),
]
# The health check goes straight to the loopback address, never through an http_proxy.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ChildExited(Exception):
    """A child process exited while it should have been running."""

    def __init__(self, name: str, code: int) -> None:
        super().__init__(f"the {name} exited on its own ({_describe_exit(code)})")
        self.name = name
        self.code = code


def migrate(database_url: str) -> None:
    """``alembic upgrade head`` on ``database_url``, in this process."""
    config = Config(str(REPO / "alembic.ini"))
    config.attributes["database_url"] = database_url
    command.upgrade(config, "head")


def dev_api_key(database_url: str, key_file: Path = KEY_FILE) -> tuple[str, bool]:
    """The key saved in ``key_file`` if it still authenticates, else a new one saved there.

    Returns the token and whether it was issued now.
    """
    saved = key_file.read_text().strip() if key_file.exists() else ""
    engine = build_engine(database_url)
    try:
        with Session(engine) as session, session.begin():
            if saved and _authenticates(session, saved):
                return saved, False
            token = create_api_key(session, tenant_name=DEV_TENANT).token
    finally:
        engine.dispose()
    _write_private(key_file, token + "\n")
    return token, True


def _authenticates(session: Session, token: str) -> bool:
    try:
        authenticate(session, token)
    except Unauthorized:
        return False
    return True


def _write_private(path: Path, text: str) -> None:
    # Written beside the target and renamed over it: a reader never sees half a key,
    # and the file is 0600 from its first byte.
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    partial.touch(mode=0o600)
    partial.write_text(text)
    partial.replace(path)


def _listen(host: str, port: int) -> socket.socket:
    # Bound here and inherited by uvicorn (--fd): port 0 gets a free port whose number
    # is known before uvicorn starts, and early requests wait in the backlog.
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.create_server((host, port), family=family, backlog=128)
    # uvicorn takes an inherited socket for a Unix one and so leaves Nagle's algorithm on
    # for its connections: a response written in two parts then waits for the client's
    # delayed ACK (~40 ms) on every keep-alive request. Accepted sockets inherit this.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    # A wildcard address accepts loopback connections, and a URL to it is not portable.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _start_children(sock: socket.socket) -> dict[str, subprocess.Popen[bytes]]:
    """The API on ``sock``, one job worker and the control worker; they share this process's
    environment and cwd."""
    children: dict[str, subprocess.Popen[bytes]] = {}
    children["API (uvicorn)"] = subprocess.Popen(
        [*API_COMMAND, "--fd", str(sock.fileno())], pass_fds=[sock.fileno()]
    )
    try:
        children["worker (celery)"] = subprocess.Popen(WORKER_COMMAND)
        children["control worker (celery beat)"] = subprocess.Popen(CONTROL_COMMAND)
    except BaseException:
        stop_children(children)
        raise
    return children


def stop_children(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM every running child, wait up to STOP_SECONDS for each, then SIGKILL it.

    SIGTERM is the graceful stop of each: uvicorn drains its connections and Celery's
    warm shutdown checkpoints a running job and puts it back in the queue.
    """
    for process in children.values():
        if process.poll() is None:
            process.terminate()
    for name, process in children.items():
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            _say(f"the {name} did not stop in {STOP_SECONDS} s; killing it")
            process.kill()
            process.wait()


def _check_running(children: dict[str, subprocess.Popen[bytes]]) -> None:
    for name, process in children.items():
        code = process.poll()
        if code is not None:
            raise ChildExited(name, code)


def _healthy(url: str) -> bool:
    try:
        with _DIRECT.open(f"{url}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, http.client.HTTPException):
        return False


def _wait_until_healthy(
    url: str, children: dict[str, subprocess.Popen[bytes]], stop: list[int]
) -> bool:
    """True once the API answers; False if a stop signal came first.

    Raises :class:`ChildExited` if a child exits, :class:`TimeoutError` at the deadline.
    """
    deadline = time.monotonic() + STARTUP_SECONDS
    while not stop:
        _check_running(children)
        if _healthy(url):
            return True
        if time.monotonic() > deadline:
            codes = ", ".join(f"{name}: {_describe_exit(p.poll())}" for name, p in children.items())
            raise TimeoutError(f"{url}/healthz did not answer in {STARTUP_SECONDS} s ({codes})")
        time.sleep(_POLL_SECONDS)
    return False


def _supervise(children: dict[str, subprocess.Popen[bytes]], stop: list[int]) -> None:
    """Return when a stop signal arrives; raise :class:`ChildExited` if a child exits first."""
    while not stop:
        _check_running(children)
        time.sleep(_POLL_SECONDS)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _say(message: str) -> None:
    print(f"devserver: {message}", file=sys.stderr, flush=True)


def _banner(url: str, token: str, new: bool) -> str:
    origin = f"new, saved in {KEY_FILE}" if new else f"from {KEY_FILE}"
    return (
        "\n"
        "  Distillery is running: the API, one job worker and the control worker.\n"
        "\n"
        f"  URL:      {url}  (API docs: {url}/docs)\n"
        f"  API key:  {token}  ({origin})\n"
        f'  Try:      curl -H "Authorization: Bearer {token}" {url}/v1/models\n'
        "\n"
        "  Ctrl-C stops them all (a running job is checkpointed and requeued).\n"
        "\n"
    )


def serve(host: str, port: int) -> int:
    """Migrate, ensure the development key, run the API and a worker until stopped.

    Returns 0 after a stop signal, 1 if a child exited on its own or the API never answered.
    """
    settings = get_settings()
    migrate(settings.database_url)
    token, new = dev_api_key(settings.database_url)

    stop: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.append(signum)

    # Installed before the children exist, so a signal at any later point is a clean stop.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # Our copy of the socket closes once uvicorn holds it, so the port closes with uvicorn.
    with _listen(host, port) as sock:
        url = _base_url(sock)
        children = _start_children(sock)
    try:
        if _wait_until_healthy(url, children, stop):
            sys.stdout.write(_banner(url, token, new))
            sys.stdout.flush()
            _supervise(children, stop)
    except ChildExited as exc:
        # Ctrl-C in a terminal signals the children too; one may exit before we notice ours.
        if not stop:
            _say(f"{exc}; stopping the other")
            return 1
    except TimeoutError as exc:
        _say(f"{exc}; stopping")
        return 1
    finally:
        if stop:
            _say("stopping the API and the workers")
        stop_children(children)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run :func:`serve`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m app.devserver", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free)")
    args = parser.parse_args(argv)
    try:
        return serve(args.host, args.port)
    except KeyboardInterrupt:
        # Ctrl-C during migration, before the children exist: nothing to stop.
        return 130


if __name__ == "__main__":
    sys.exit(main())

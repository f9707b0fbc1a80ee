"""``python -m app.devserver`` (``make serve``): the whole service from an empty folder, twice."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from app.devserver import _listen
from tests.app.databases import REPO

#: Migrating, importing the app and booting the worker, on a busy two-core machine.
STARTUP_SECONDS = 60
#: Warm shutdown of the children after SIGINT.
SHUTDOWN_SECONDS = 60
URL_LINE = re.compile(r"^\s*URL:\s+(http://\S+)")
KEY_LINE = re.compile(r"^\s*API key:\s+(dk_\S+)")


@dataclass
class DevServer:
    """A running devserver: its process and every line it printed so far."""

    process: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    def output(self) -> str:
        """What it printed so far, for failure messages."""
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())
        return "".join(self.seen)

    def wait_for_banner(self) -> tuple[str, str]:
        """The URL and API key of the banner; fails the test at the deadline."""
        url = key = None
        deadline = time.monotonic() + STARTUP_SECONDS
        while url is None or key is None:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no banner in {STARTUP_SECONDS} s:\n{self.output()}"
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            assert line, f"devserver exited ({self.process.poll()}):\n{self.output()}"
            if match := URL_LINE.match(line):
                url = match.group(1)
            if match := KEY_LINE.match(line):
                key = match.group(1)
        return url, key


def start_devserver(folder: Path) -> DevServer:
    """``python -m app.devserver --port 0`` in ``folder`` on the embedded defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    env["PYTHONPATH"] = str(REPO)
    process = subprocess.Popen(
        [sys.executable, "-m", "app.devserver", "--port", "0"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = DevServer(process)

    def drain() -> None:
        # Read to the end, so neither the devserver nor its children block on a full pipe;
        # "" marks the end.
        assert process.stdout is not None
        for line in process.stdout:
            server.lines.put(line)
        server.lines.put("")

    threading.Thread(target=drain, daemon=True).start()
    return server


def wait_until(condition: Callable[[], bool], what: str, server: DevServer) -> None:
    """Poll ``condition`` until it holds; fails the test with the output at the deadline."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"{what} not in {STARTUP_SECONDS} s:\n{server.output()}"
        time.sleep(0.1)


def worker_booted(tree: list[psutil.Process]) -> bool:
    """Whether both Celery workers are past their startup: the job worker has forked its
    pool process and the control worker its embedded beat."""
    booted = {"job": False, "control": False}
    for process in tree:
        try:
            command = " ".join(process.cmdline())
            if "celery" in command and " worker" in command and process.children():
                booted["control" if "distillery.control" in command else "job"] = True
        except psutil.Error:
            continue
    return all(booted.values())


def process_tree(server: DevServer) -> list[psutil.Process]:
    """The devserver's descendants, once the API and the booted worker are all there."""
    parent = psutil.Process(server.process.pid)
    wait_until(lambda: worker_booted(parent.children(recursive=True)), "worker booted", server)
    return parent.children(recursive=True)


def running(process: psutil.Process) -> bool:
    """Whether ``process`` still runs (a zombie has exited, it only awaits its parent)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_cleanly(server: DevServer, tree: list[psutil.Process]) -> None:
    """SIGINT the devserver: it exits 0 and leaves no child running."""
    server.process.send_signal(signal.SIGINT)
    try:
        code = server.process.wait(timeout=SHUTDOWN_SECONDS)
    except subprocess.TimeoutExpired:
        server.process.kill()
        raise AssertionError(f"still running after SIGINT:\n{server.output()}") from None
    assert code == 0, server.output()
    _, alive = psutil.wait_procs(tree, timeout=5)
    alive = [p for p in alive if running(p)]
    for process in alive:
        process.kill()
    assert not alive, f"left running: {[p.cmdline() for p in alive]}\n{server.output()}"


def test_serves_from_an_empty_folder_and_reuses_its_key(tmp_path: Path) -> None:
    first = start_devserver(tmp_path)
    try:
        url, key = first.wait_for_banner()
        assert f'curl -H "Authorization: Bearer {key}" {url}/v1/models' in first.output()
        assert "Ctrl-C stops them all" in first.output()
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/healthz").status_code == 200
            authorized = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert authorized.status_code == 200, authorized.text
            assert client.get("/v1/models").status_code == 401
        var = tmp_path / "var"
        assert (var / "distillery.db").is_file()
        assert (var / "broker").is_dir()
        assert (var / "dev-api-key").read_text().strip() == key
        assert (var / "dev-api-key").stat().st_mode & 0o777 == 0o600
        stop_cleanly(first, process_tree(first))
    finally:
        if first.process.poll() is None:
            first.process.kill()

    second = start_devserver(tmp_path)
    try:
        _, reused = second.wait_for_banner()
        assert reused == key
        stop_cleanly(second, process_tree(second))
    finally:
        if second.process.poll() is None:
            second.process.kill()


def test_the_api_socket_turns_off_nagle_for_every_connection() -> None:
    # uvicorn takes the inherited socket for a Unix one and sets no TCP_NODELAY itself.
    with _listen("127.0.0.1", 0) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        with socket.create_connection(sock.getsockname()[:2]):
            accepted, _ = sock.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

"""Status polling under load: ``GET /v1/jobs/{id}`` against a constant handler, in one run.

Starts, on loopback, the API on a fresh PostgreSQL database (one queued job) and
a bare FastAPI app answering a constant JSON, then drives both with the same load
generator (wrk when installed, else a bounded asyncio HTTP/1.1 client) at each
connection count. It prints req/s, p50/p99, non-2xx answers and timeouts for
each, and the ratio to the constant handler: full reads and conditional reads
(304) as served (the job unchanged, so remembered by the process), then both
again from a second API process with ``DISTILL_REMEMBER_JOBS=false``, where each
read is a query; then N idle SSE followers of one job: the API's memory and CPU and
the database's transactions per second while they idle, and how long each takes
to get the terminal event once the job ends.

    python bench/api_poll.py                              # about two minutes
    python bench/api_poll.py --duration 10 --followers 1000 --connections 8,16,64,256
    python bench/api_poll.py --api-workers 2              # uvicorn --workers 2

Needs PostgreSQL on 127.0.0.1:5432 with trust auth (as the tests do).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.responses import Response

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: The constant handler's app (``uvicorn api_poll:constant_app --app-dir bench``).
constant_app = FastAPI()
_CONSTANT = b'{"id":"00000000-0000-0000-0000-000000000000","status":"queued","progress":null}'


@constant_app.get("/v1/jobs/{job_id}")
async def constant(job_id: str) -> Response:
    """The same JSON every time: what serving a poll costs with no work behind it."""
    return Response(_CONSTANT, media_type="application/json")


PG_ADMIN = "postgresql+psycopg://{user}@127.0.0.1:5432/{db}"
#: Seconds a single request may take before it counts as a timeout.
REQUEST_TIMEOUT_S = 10.0


@dataclass
class LoadResult:
    """What one load run measured."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    timeouts: int

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0


# ------------------------------------------------------------------ setup


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database's URL; dropped on exit."""
    from alembic import command
    from alembic.config import Config

    admin = None
    for user in ("postgres", "root"):
        candidate = sa.create_engine(
            PG_ADMIN.format(user=user, db="postgres"), isolation_level="AUTOCOMMIT"
        )
        try:
            with candidate.connect():
                admin = candidate
                break
        except sa.exc.OperationalError:
            candidate.dispose()
    if admin is None:
        sys.exit("PostgreSQL on 127.0.0.1:5432 is not reachable")
    name = f"distillery_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = str(admin.url.set(database=name).render_as_string(hide_password=False))
    try:
        config = Config(str(ROOT / "alembic.ini"))
        config.attributes["database_url"] = url
        config.attributes["configure_logger"] = False
        command.upgrade(config, "head")
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def seed(url: str) -> tuple[str, str]:
    """An API key and one queued job of its tenant: ``(bearer header value, job id)``."""
    from sqlalchemy.orm import Session

    from app.auth.service import create_api_key
    from app.jobs.models import QUEUED, Job
    from app.jobs.repository import JobRepository

    engine = sa.create_engine(url)
    with Session(engine) as session, session.begin():
        issued = create_api_key(session, tenant_name="bench")
        job = Job(
            id=uuid.uuid4(),
            tenant_id=issued.tenant.id,
            status=QUEUED,
            spec={"training": {"epochs": 20}},
            attempt=0,
            partial=False,
            request_sha256="0" * 64,
        )
        session.add(job)
        session.flush()
        JobRepository(session).add_event(job.id, "status", {"status": QUEUED}, attempt=0)
        job_id = str(job.id)
    engine.dispose()
    return f"Bearer {issued.token}", job_id


def end_job(url: str, job_id: str) -> None:
    """Fail the job from this process, as a worker would end it."""
    from sqlalchemy.orm import Session

    from app.jobs.models import FAILED, QUEUED, Job
    from app.jobs.service import change_status

    engine = sa.create_engine(url)
    with Session(engine) as session, session.begin():
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        change_status(session, job, FAILED, from_statuses=[QUEUED])
    engine.dispose()


@contextmanager
def server(argv: list[str], env: dict[str, str], log: Path) -> Iterator[tuple[int, int]]:
    """uvicorn ``argv`` on a free loopback port: yields (port, pid) once it answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", *argv, "--port", str(port), "--no-access-log"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                    break
                except httpx.TransportError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        sys.exit(f"uvicorn {argv} did not start:\n{log.read_text()}")
                    time.sleep(0.2)
            yield port, process.pid
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


# ------------------------------------------------------------------ load generators


def run_wrk(url: str, headers: dict[str, str], connections: int, seconds: float) -> LoadResult:
    """wrk's figures for ``connections`` connections over ``seconds``."""
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds:.0f}s", "--latency"]
    argv += [f"--timeout={REQUEST_TIMEOUT_S:.0f}s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout

    def latency(pct: str) -> float:
        found = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not found:
            return float("nan")
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]
        return float(found.group(1)) * scale

    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    assert total, out
    elapsed = float(total.group(2)) * (1 if total.group(3) == "s" else 0.001)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    timeouts = re.search(r"timeout (\d+)", out)
    return LoadResult(
        int(total.group(1)),
        elapsed,
        latency("50"),
        latency("99"),
        int(non_2xx.group(1)) if non_2xx else 0,
        int(timeouts.group(1)) if timeouts else 0,
    )


async def _client(
    port: int, request: bytes, stop_at: float, latencies: list[float], failures: list[str]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = re.search(rb"(?i)content-length: (\d+)", head)
                    await reader.readexactly(int(length.group(1)) if length else 0)
            except TimeoutError:
                failures.append("timeout")
                return
            latencies.append(time.perf_counter() - started)
            if not head.startswith((b"HTTP/1.1 2", b"HTTP/1.1 304")):
                failures.append("non-2xx")
    finally:
        writer.close()


def run_python(
    port: int, path: str, headers: dict[str, str], connections: int, seconds: float
) -> LoadResult:
    """A bounded asyncio HTTP/1.1 keep-alive client: ``connections`` loops for ``seconds``."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    latencies: list[float] = []
    failures: list[str] = []

    async def drive() -> float:
        started = time.monotonic()
        stop_at = started + seconds
        await asyncio.gather(
            *(_client(port, request, stop_at, latencies, failures) for _ in range(connections)),
            return_exceptions=True,
        )
        return time.monotonic() - started

    elapsed = asyncio.run(drive())
    ordered = sorted(latencies) or [float("nan")]
    return LoadResult(
        len(latencies),
        elapsed,
        ordered[len(ordered) // 2] * 1000,
        ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        failures.count("non-2xx"),
        failures.count("timeout"),
    )


def load(
    generator: str, port: int, path: str, headers: dict[str, str], conns: int, secs: float
) -> LoadResult:
    """One load run with the chosen generator."""
    if generator == "wrk":
        return run_wrk(f"http://127.0.0.1:{port}{path}", headers, conns, secs)
    return run_python(port, path, headers, conns, secs)


# ------------------------------------------------------------------ idle SSE followers


async def _follow(port: int, request: bytes, ready: asyncio.Event, ended: list[float]) -> None:
    """One SSE follower: counts in once the first event came, notes when the terminal came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
    writer.write(request)
    try:
        seen_first = False
        while line := await reader.readline():
            if line.startswith(b"event: ") and not seen_first:
                seen_first = True
                ready.set()
            if line.startswith(b"event: terminal"):
                ended.append(time.monotonic())
                return
    finally:
        writer.close()


def database_transactions(url: str) -> int:
    """Transactions the database has counted so far (committed and rolled back)."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        count = conn.execute(
            sa.text(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                "WHERE datname = current_database()"
            )
        ).scalar_one()
    engine.dispose()
    return int(count)


def process_tree(pid: int) -> list[psutil.Process]:
    """The uvicorn process and its worker processes."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


async def followers(
    args: argparse.Namespace, port: int, pid: int, url: str, auth: str, job: str
) -> None:
    """Open the followers, measure them idle, end the job, time the terminal events."""
    request = (
        f"GET /v1/jobs/{job}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: {auth}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    ended: list[float] = []
    readies = [asyncio.Event() for _ in range(args.followers)]
    tasks = []
    for ready in readies:
        tasks.append(asyncio.create_task(_follow(port, request, ready, ended)))
        await asyncio.sleep(0.002)  # paced, so the backlog never overflows
    async with asyncio.timeout(120):
        await asyncio.gather(*(ready.wait() for ready in readies))
    # PostgreSQL flushes an idle backend's statistics up to 10 s late: wait until the
    # openings' own queries are counted, so the window sees only what idling costs.
    await asyncio.sleep(12)
    procs = process_tree(pid)
    cpu_before = sum(sum(p.cpu_times()[:2]) for p in procs)
    tx_before = database_transactions(url)
    await asyncio.sleep(args.idle)
    tx_after = database_transactions(url)
    cpu_after = sum(sum(p.cpu_times()[:2]) for p in procs)
    rss = sum(p.memory_info().rss for p in procs) / 2**20
    # One transaction of the window is the statistics query itself.
    print(
        f"  {args.followers} idle SSE followers over {args.idle:.0f} s: RSS {rss:.0f} MiB, "
        f"CPU {100 * (cpu_after - cpu_before) / args.idle:.1f}% of a core, "
        f"database {(tx_after - tx_before - 1) / args.idle:.2f} transactions/s"
    )
    ended_at = time.monotonic()
    await asyncio.to_thread(end_job, url, job)
    async with asyncio.timeout(60):
        await asyncio.gather(*tasks, return_exceptions=True)
    delays = sorted(t - ended_at for t in ended)
    print(
        f"  terminal event: {len(delays)}/{args.followers} followers, "
        f"p50 {1000 * delays[len(delays) // 2]:.0f} ms, max {1000 * delays[-1]:.0f} ms"
        if delays
        else "  terminal event: none arrived"
    )


# ------------------------------------------------------------------ main


def _row(label: str, result: LoadResult, baseline: LoadResult | None) -> str:
    ratio = f"{result.rate / baseline.rate:5.2f}x" if baseline and baseline.rate else "    -"
    return (
        f"  {label:<22} {result.rate:8.0f} req/s  p50 {result.p50_ms:7.1f} ms  "
        f"p99 {result.p99_ms:7.1f} ms  non-2xx {result.non_2xx:5d}  timeouts "
        f"{result.timeouts:4d}  {ratio}"
    )


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", default="8,64,256", help="comma-separated counts")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load run")
    parser.add_argument("--followers", type=int, default=200, help="idle SSE followers")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds followers idle")
    parser.add_argument("--api-workers", type=int, default=1, help="uvicorn --workers")
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    args = parser.parse_args()
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    counts = [int(c) for c in args.connections.split(",")]
    print(f"load generator: {generator}; machine load: {os.getloadavg()[0]:.2f} (1 min)")
    folder = Path(tempfile.mkdtemp(prefix="api-poll-"))
    with postgres_database() as url:
        auth, job = seed(url)
        env = {
            "DISTILL_DATABASE_URL": url,
            "DISTILL_STORAGE_URL": f"file://{folder / 'artifacts'}",
            "DISTILL_BROKER_URL": f"filesystem://{folder / 'broker'}",
            "DISTILL_WORK_DIR": str(folder / "work"),
        }
        api_argv = [
            *("app.main:app", "--workers", str(args.api_workers)),
            *("--http", "app.http_protocol:BoundedHeadersProtocol"),
        ]
        const_argv = ["api_poll:constant_app", "--app-dir", "bench"]
        path = f"/v1/jobs/{job}"
        headers = {"Authorization": auth}
        unremembered = {**env, "DISTILL_REMEMBER_JOBS": "false"}
        with (
            server(api_argv, env, folder / "api.log") as (api_port, api_pid),
            server(api_argv, unremembered, folder / "api-db.log") as (db_port, _),
            server(const_argv, {}, folder / "constant.log") as (const_port, _),
        ):
            etag = httpx.get(f"http://127.0.0.1:{api_port}{path}", headers=headers).headers["etag"]
            conditional = {**headers, "If-None-Match": etag}
            for conns in counts:
                print(f"{conns} connections, {args.duration:.0f} s each:")
                base = load(generator, const_port, path, {}, conns, args.duration)
                print(_row("constant handler", base, None))
                full = load(generator, api_port, path, headers, conns, args.duration)
                print(_row("GET /v1/jobs/{id}", full, base))
                cond = load(generator, api_port, path, conditional, conns, args.duration)
                print(_row("  If-None-Match (304)", cond, base))
                read = load(generator, db_port, path, headers, conns, args.duration)
                print(_row("  each read a query", read, base))
                cond = load(generator, db_port, path, conditional, conns, args.duration)
                print(_row("  each 304 a query", cond, base))
            asyncio.run(followers(args, api_port, api_pid, url, auth, job))
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

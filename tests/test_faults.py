"""Fault tests: real processes (uvicorn, Celery workers, Redis, PostgreSQL) killed, paused
and restarted while jobs run. Every job must reach exactly one terminal state with
exactly one set of artifacts, whatever dies.

The module runs its own redis-server (so it can restart it) and PostgreSQL
database, one API and one control worker (beat + the reconciler, restarted if it
exits, as compose restarts it) for all tests, and starts, kills and pauses job
workers per test. Leases are short (6 s, renewed every 2 s) and the reconciler runs
every second, so a lost worker is noticed within seconds. A lease shorter than that
lapsed now and then on a busy two-core machine running two test processes, and a job
that nothing interrupted ran twice.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import redis
import sqlalchemy as sa

from tests.app import servers
from tests.app.databases import REPO, postgres_database
from tests.app.factories import tiny_onnx_classifier
from tests.app.servers import CELERY_WORKER, uvicorn_server, wait_for_log
from tests.test_end_to_end import entry_point
from tests.worker.engine.factories import write_npz

pytestmark = pytest.mark.slow

LEASE_S = 6.0
DEADLINE_S = 120.0
#: A job of a few seconds of training, checkpointed every 40 steps.
SPEC = {
    "training": {"epochs": 40, "batch_size": 32, "checkpoint_every_steps": 40, "seed": 3},
}
ARTIFACTS = 6
#: The control worker with beat embedded, as ``make serve`` runs it.
CONTROL_WORKER = [
    *CELERY_WORKER,
    *("--queues", "distillery.control", "--pool", "threads", "--concurrency", "2"),
    *("--hostname", "control@%h", "--loglevel", "INFO", "--beat"),
]


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server of the module's own, with nothing on disk: a restart loses everything."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        volatile = ["--save", "", "--appendonly", "no", "--dir", str(self.folder)]
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", *volatile],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _pings(client), "redis-server to answer")
        client.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@dataclass
class Worker:
    """A Celery job worker in a process group of its own (so its pool dies with it)."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def pids(self) -> list[int]:
        try:
            parent = psutil.Process(self.process.pid)
            return [parent.pid] + [c.pid for c in parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def signal_all(self, sig: signal.Signals) -> None:
        os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        """SIGKILL the worker and its pool at once."""
        if self.process.poll() is None:
            self.signal_all(signal.SIGKILL)
        self.process.wait()

    def logged(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text)


@dataclass
class Cluster:
    """The API, the control worker, and the job workers a test starts."""

    api: str
    key: str
    env: dict[str, str]
    folder: Path
    redis: RedisServer
    workers: list[Worker] = field(default_factory=list)

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.api, headers={"Authorization": f"Bearer {self.key}"}, timeout=30
        )

    def start_worker(self, **env: str) -> Worker:
        name = f"w{len(self.workers)}-{time.monotonic_ns()}"
        log = self.folder / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [*CELERY_WORKER, "--loglevel", "INFO", "--hostname", f"{name}@%h"],
                cwd=REPO,
                env={**os.environ, **self.env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(name, process, log)
        self.workers.append(worker)
        wait_for_log(process, log, " ready.", 60)
        return worker


def wait_until(condition: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S) -> Any:
    """:func:`tests.app.servers.wait_until` with this module's deadline."""
    return servers.wait_until(condition, what, deadline_s)


class RestartedOnExit:
    """A process restarted whenever it exits, as compose's ``restart: unless-stopped`` keeps
    the control worker: Celery's Redis transport can end a worker on a broker restart
    (an ``Unrecoverable error`` while a task's message is acknowledged mid-reconnect), and
    production brings it back. ``restarts`` counts the times it had to."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.argv, self.env, self.log = argv, env, log
        self.restarts = 0
        self._stopped = threading.Event()
        self.process = self._start()
        self._watch = threading.Thread(target=self._restart_on_exit, daemon=True)
        self._watch.start()

    def _start(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:
            return subprocess.Popen(
                self.argv,
                cwd=REPO,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _restart_on_exit(self) -> None:
        while not self._stopped.wait(0.2):
            if self.process.poll() is not None and not self._stopped.is_set():
                self.restarts += 1
                self.process = self._start()

    def stop(self) -> None:
        """Kill the process and stop restarting it."""
        self._stopped.set()
        self._watch.join()
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("faults")
    broker = RedisServer(folder)
    broker.start()
    try:
        with postgres_database() as database_url:
            env = {
                "DISTILL_DATABASE_URL": database_url,
                "DISTILL_BROKER_URL": broker.url,
                "DISTILL_STORAGE_URL": f"file://{folder / 'artifacts'}",
                "DISTILL_WORK_DIR": str(folder / "work"),
                "DISTILL_DEVICE": "cpu",
                "DISTILL_LEASE_SECONDS": str(LEASE_S),
                "DISTILL_RECONCILE_INTERVAL_S": "1",
                "DISTILL_RESEND_GRACE_S": "2",
                "DISTILL_MAX_ATTEMPTS": "3",
                "DISTILL_WEBHOOK_ALLOW_PRIVATE": "true",
                "DISTILL_WEBHOOK_POLL_S": "0.5",
                "DISTILL_WEBHOOK_RETRY_BASE_S": "0.5",
            }
            entry_point(["-m", "alembic", "upgrade", "head"], env)
            key = entry_point(["-m", "app.cli", "create-api-key", "--tenant", "faults"], env)
            control_log = folder / "control.log"
            control = RestartedOnExit(
                [*CONTROL_WORKER, "--schedule", str(folder / "beat-schedule")], env, control_log
            )
            try:
                wait_for_log(control.process, control_log, " ready.", 60)
                with uvicorn_server(env, folder / "api.log") as api:
                    made = Cluster(api.base_url, key.strip(), env, folder, broker)
                    yield made
                    for worker in made.workers:
                        worker.kill()
            finally:
                control.stop()
    finally:
        broker.kill()


@pytest.fixture
def inputs(cluster: Cluster, tmp_path: Path) -> dict[str, str]:
    """A small teacher and a 1,200-row transfer set, uploaded once per test."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1200, 16)).astype(np.float32)
    dataset = write_npz(tmp_path / "d.npz", x).read_bytes()
    with cluster.client() as client:
        model = client.post(
            "/v1/models", files={"file": ("t.onnx", tiny_onnx_classifier(16, 4, seed=1))}
        )
        data = client.post("/v1/datasets", files={"file": ("d.npz", dataset)})
        assert model.status_code == data.status_code == 201, (model.text, data.text)
        return {"teacher_model_id": model.json()["id"], "dataset_id": data.json()["id"]}


@pytest.fixture(autouse=True)
def _stop_workers(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "cluster" in request.fixturenames:
        made: Cluster = request.getfixturevalue("cluster")
        for worker in made.workers:
            worker.kill()
        made.workers.clear()


# --------------------------------------------------------------------------- job views


def submit(cluster: Cluster, inputs: dict[str, str], **extra: Any) -> str:
    with cluster.client() as client:
        response = client.post("/v1/jobs", json={**inputs, **SPEC, **extra})
        assert response.status_code == 202, response.text
        return response.json()["id"]


def job(cluster: Cluster, job_id: str) -> dict[str, Any]:
    with cluster.client() as client:
        return client.get(f"/v1/jobs/{job_id}").json()


def events(cluster: Cluster, job_id: str) -> list[dict[str, Any]]:
    with cluster.client() as client:
        return client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]


def checkpointed(cluster: Cluster, job_id: str, attempt: int) -> bool:
    return any(
        e["type"] == "checkpoint" and e["attempt"] == attempt for e in events(cluster, job_id)
    )


def finished(cluster: Cluster, job_id: str) -> dict[str, Any] | None:
    found = job(cluster, job_id)
    return found if found["status"] in ("succeeded", "failed", "cancelled") else None


def lease_owner(cluster: Cluster, job_id: str) -> str | None:
    """Who holds the job's lease (``host:pid`` of a worker child), read from the database."""
    engine = sa.create_engine(cluster.env["DISTILL_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT lease_owner FROM jobs WHERE id = :id"), {"id": job_id}
            ).scalar_one()
    finally:
        engine.dispose()


def assert_ran_once(cluster: Cluster, job_id: str, *, attempts: int) -> dict[str, Any]:
    """The job succeeded after ``attempts`` claims, with one terminal event and one artifact set."""
    done = job(cluster, job_id)
    assert done["status"] == "succeeded", done["error"]
    log = events(cluster, job_id)
    requeues = [e["data"] for e in log if "reason" in e["data"]]
    assert done["attempt"] == attempts, f"requeued: {requeues}"
    assert [e["type"] for e in log].count("terminal") == 1
    with cluster.client() as client:
        artifacts = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    assert len(artifacts) == ARTIFACTS
    stored = list((cluster.folder / "artifacts").rglob(f"jobs/{job_id.replace('-', '')}/**/*.*"))
    assert len(stored) == ARTIFACTS, stored
    return done


# --------------------------------------------------------------------------- the faults


def test_a_job_resumes_after_its_worker_child_and_then_its_worker_are_killed(
    cluster: Cluster, inputs: dict[str, str]
) -> None:
    first = cluster.start_worker()
    job_id = submit(cluster, inputs)
    wait_until(lambda: checkpointed(cluster, job_id, 1), "a checkpoint of attempt 1")
    owner = lease_owner(cluster, job_id)
    assert owner is not None
    child = int(owner.rsplit(":", 1)[1])
    assert child in first.pids()
    os.kill(child, signal.SIGKILL)
    first.kill()

    cluster.start_worker()
    wait_until(lambda: finished(cluster, job_id), "the job to finish")
    interrupted = assert_ran_once(cluster, job_id, attempts=2)
    log = events(cluster, job_id)
    resumed = [e for e in log if e["type"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["attempt"] == 2 and resumed[0]["data"]["step"] > 0
    requeued = [e for e in log if e["data"].get("reason") == "lease_expired"]
    assert len(requeued) == 1

    # The same seeded job, never interrupted, ends with the same metrics.
    again = submit(cluster, inputs)
    wait_until(lambda: finished(cluster, again), "the uninterrupted job")
    plain = assert_ran_once(cluster, again, attempts=1)
    for side in ("student",):
        for metric in ("accuracy", "f1_macro", "parameters"):
            assert interrupted["metrics"][side][metric] == plain["metrics"][side][metric]
    for metric in ("agreement", "kl_divergence", "output_mse"):
        assert interrupted["metrics"]["fidelity"][metric] == pytest.approx(
            plain["metrics"]["fidelity"][metric], rel=1e-6, abs=1e-9
        )


def test_a_message_delivered_twice_runs_the_job_once(
    cluster: Cluster, inputs: dict[str, str]
) -> None:
    # Redis hands an unacknowledged message to another consumer after the visibility
    # timeout: here 1 s, far shorter than the job.
    short = {"DISTILL_VISIBILITY_TIMEOUT_S": "1"}
    first = cluster.start_worker(**short)
    job_id = submit(cluster, inputs, training={**SPEC["training"], "epochs": 80})
    wait_until(lambda: job(cluster, job_id)["status"] == "running", "the job to start")
    second = cluster.start_worker(**short)
    received = "Task distillery.run_job["
    wait_until(lambda: finished(cluster, job_id), "the job to finish")
    assert_ran_once(cluster, job_id, attempts=1)
    deliveries = first.logged(received) + second.logged(received)
    assert deliveries >= 2, "the message was not delivered twice"
    statuses = [e["data"]["status"] for e in events(cluster, job_id) if "status" in e["data"]]
    assert statuses == ["queued", "running", "succeeded"]


def test_a_paused_worker_past_its_lease_writes_nothing_when_it_wakes(
    cluster: Cluster, inputs: dict[str, str]
) -> None:
    paused = cluster.start_worker()
    job_id = submit(cluster, inputs, training={**SPEC["training"], "epochs": 80})
    wait_until(lambda: checkpointed(cluster, job_id, 1), "a checkpoint of attempt 1")
    paused.signal_all(signal.SIGSTOP)
    try:
        cluster.start_worker()
        wait_until(lambda: job(cluster, job_id)["attempt"] == 2, "another worker to take over")
        takeover = max(e["id"] for e in events(cluster, job_id))
    finally:
        paused.signal_all(signal.SIGCONT)
    wait_until(lambda: finished(cluster, job_id), "the job to finish")
    assert_ran_once(cluster, job_id, attempts=2)
    late = [e for e in events(cluster, job_id) if e["id"] > takeover and e["attempt"] == 1]
    assert late == [], late


def test_a_redis_restart_loses_nothing(cluster: Cluster, inputs: dict[str, str]) -> None:
    cluster.start_worker()
    running = submit(cluster, inputs)
    wait_until(lambda: checkpointed(cluster, running, 1), "the first job to run")
    waiting = submit(cluster, inputs)
    assert job(cluster, waiting)["status"] == "queued"
    cluster.redis.kill()
    cluster.redis.start()  # empty: both messages are gone
    for job_id in (running, waiting):
        wait_until(partial(finished, cluster, job_id), f"job {job_id} to finish")
    assert_ran_once(cluster, running, attempts=1)
    assert_ran_once(cluster, waiting, attempts=1)


def test_a_job_whose_workers_keep_dying_fails_after_its_attempts(
    cluster: Cluster, inputs: dict[str, str]
) -> None:
    job_id = submit(cluster, inputs, training={**SPEC["training"], "epochs": 400})
    for attempt in (1, 2, 3):
        worker = cluster.start_worker()

        def started(attempt: int = attempt) -> bool:
            return (
                job(cluster, job_id)["attempt"] == attempt
                and job(cluster, job_id)["status"] == "running"
            )

        wait_until(started, f"attempt {attempt} to start")
        worker.kill()
    failed = wait_until(lambda: finished(cluster, job_id), "the job to fail")
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "max_attempts_exceeded"
    assert failed["attempt"] == 3
    broker = cluster.redis.client()
    try:
        assert broker.llen("distillery.jobs") == 0
    finally:
        broker.close()
    # A worker that comes back finds nothing to run.
    worker = cluster.start_worker()
    assert job(cluster, job_id)["status"] == "failed"
    assert worker.process.poll() is None


def test_sigterm_hands_the_job_back_and_another_worker_resumes_it(
    cluster: Cluster, inputs: dict[str, str]
) -> None:
    leaving = cluster.start_worker()
    job_id = submit(cluster, inputs)
    wait_until(lambda: checkpointed(cluster, job_id, 1), "a checkpoint of attempt 1")
    asked = time.monotonic()
    leaving.process.send_signal(signal.SIGTERM)
    wait_until(lambda: job(cluster, job_id)["status"] == "queued", "the hand-back", 30)
    handed_back = time.monotonic() - asked
    assert leaving.process.wait(timeout=30) == 0
    print(f"SIGTERM to hand-back: {handed_back:.1f} s")
    back = [e for e in events(cluster, job_id) if e["data"].get("reason") == "worker_shutdown"]
    assert len(back) == 1

    cluster.start_worker()
    wait_until(lambda: finished(cluster, job_id), "the job to finish")
    assert_ran_once(cluster, job_id, attempts=2)
    resumed = [e for e in events(cluster, job_id) if e["type"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["data"]["step"] > 0


def test_cancel_before_start_mid_run_and_after_the_end(
    cluster: Cluster, inputs: dict[str, str]
) -> None:
    early = submit(cluster, inputs)
    with cluster.client() as client:
        assert client.post(f"/v1/jobs/{early}/cancel").json()["status"] == "cancelled"
    cluster.start_worker()
    mid = submit(cluster, inputs, training={**SPEC["training"], "epochs": 400})
    wait_until(lambda: checkpointed(cluster, mid, 1), "the job to run")
    with cluster.client() as client:
        asked = time.monotonic()
        assert client.post(f"/v1/jobs/{mid}/cancel").json()["status"] == "cancelling"
        wait_until(lambda: finished(cluster, mid), "the cancellation", 30)
        print(f"cancel to cancelled: {time.monotonic() - asked:.1f} s")
        assert job(cluster, mid)["status"] == "cancelled"
        assert client.post(f"/v1/jobs/{mid}/cancel").json()["status"] == "cancelled"
        done = submit(cluster, inputs)
        wait_until(lambda: finished(cluster, done), "a job to finish")
        response = client.post(f"/v1/jobs/{done}/cancel")
        assert response.status_code == 409 and response.json()["code"] == "job_finished"
    # The early job's message reached the worker and changed nothing.
    assert job(cluster, early)["status"] == "cancelled" and job(cluster, early)["attempt"] == 0
    checkpoints = cluster.folder / "work" / "jobs" / mid.replace("-", "") / "checkpoints"
    assert (checkpoints / "attempt-1" / "latest").is_file()
    for job_id in (early, mid):
        kinds = [e["type"] for e in events(cluster, job_id)]
        assert kinds.count("terminal") == 1 and kinds[-1] == "terminal"


class Receiver(ThreadingHTTPServer):
    """A webhook receiver on loopback: answers 500 to its first request, then 200."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/distillery"


class _ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            status = 500 if not self.server.received else 200
            self.server.received.append((dict(self.headers), body, status))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_webhook_receiver_sees_every_transition_once_after_a_500(
    cluster: Cluster, inputs: dict[str, str]
) -> None:
    receiver = Receiver()
    serving = threading.Thread(target=receiver.serve_forever, daemon=True)
    serving.start()
    try:
        cluster.start_worker()
        job_id = submit(cluster, inputs, webhook_url=receiver.url)
        wait_until(lambda: finished(cluster, job_id), "the job to finish")

        def acknowledged() -> dict[str, dict[str, Any]]:
            with receiver.lock:
                return {
                    h["Distillery-Event-Id"]: json.loads(body)
                    for h, body, status in receiver.received
                    if status == 200
                }

        statuses = ["queued", "running", "succeeded"]
        wait_until(lambda: len(acknowledged()) == len(statuses), "every transition delivered")
    finally:
        receiver.shutdown()
        receiver.server_close()
    with cluster.client() as client:
        secret = client.get("/v1/webhook-secret").json()["secret"]
    assert receiver.received[0][2] == 500
    delivered = [(h, body) for h, body, status in receiver.received if status == 200]
    assert [json.loads(body)["status"] for _, body in delivered] == statuses
    assert len({h["Distillery-Event-Id"] for h, _ in delivered}) == len(statuses)
    for headers, body, _ in receiver.received:
        stamp = headers["Distillery-Timestamp"]
        expected = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256)
        assert headers["Distillery-Signature"] == f"v1={expected.hexdigest()}"
    log = events(cluster, job_id)
    attempts = [e for e in log if e["type"] == "webhook"]
    assert len(attempts) == len(receiver.received)
    assert [a["data"]["delivered"] for a in attempts].count(False) == 1

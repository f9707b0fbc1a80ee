"""The whole service as production runs it, spoken to over plain HTTP.

Each test starts the real processes: ``alembic upgrade head``, ``python -m
app.cli create-api-key``, uvicorn and a Celery worker, once on the embedded
defaults (SQLite, the filesystem broker) and once on PostgreSQL with Redis.
It uploads an ONNX teacher and an ``.npz`` transfer set, submits a job,
follows it over Server-Sent Events to its terminal event, downloads
``student.onnx`` and ``metrics.json``, and checks the student against the
teacher on held-out data.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import redis

from tests.app.databases import REPO, postgres_database
from tests.app.servers import celery_worker, uvicorn_server, wait_until
from tests.worker.engine.factories import digits, export_onnx_legacy, train_mlp_teacher, write_npz
from worker.engine.evaluation import validate_metrics

pytestmark = pytest.mark.slow

#: A Redis database of the tests' own, emptied before and after use.
REDIS_URL = "redis://127.0.0.1:6379/11"
JOB_DEADLINE_S = 300
TRAIN_ROWS = 1400


@dataclass(frozen=True)
class Digits:
    """A teacher trained on digits' first rows, its transfer set, and the held-out rest."""

    teacher_onnx: bytes
    transfer_npz: bytes
    held_out_x: np.ndarray
    held_out_y: np.ndarray


@dataclass(frozen=True)
class Service:
    """A running API and worker: where to reach them and the key to use."""

    base_url: str
    key: str
    worker: subprocess.Popen[bytes]
    worker_log: Path
    #: Uploads are inspected by the worker (``processing`` first), not by the API.
    deferred: bool

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60
        )


@pytest.fixture(scope="module")
def digits_case(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    """A torch MLP teacher exported to ONNX (one file), trained on 1,400 shuffled digits."""
    import torch

    folder = tmp_path_factory.mktemp("digits")
    x, y = digits()
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    teacher = train_mlp_teacher(x[:TRAIN_ROWS], y[:TRAIN_ROWS], epochs=40)
    path = export_onnx_legacy(teacher, (torch.from_numpy(x[:1]),), folder / "teacher.onnx")
    transfer = write_npz(folder / "transfer.npz", x[:TRAIN_ROWS], y[:TRAIN_ROWS])
    return Digits(path.read_bytes(), transfer.read_bytes(), x[TRAIN_ROWS:], y[TRAIN_ROWS:])


@contextmanager
def backing_services(kind: str, folder: Path) -> Iterator[tuple[str, str]]:
    """Fresh (database URL, broker URL): SQLite and a broker folder, or PostgreSQL and Redis."""
    if kind == "embedded":
        yield f"sqlite:///{folder / 'var' / 'distillery.db'}", f"filesystem://{folder / 'broker'}"
        return
    broker = redis.Redis.from_url(REDIS_URL)
    broker.flushdb()
    try:
        with postgres_database() as url:
            yield url, REDIS_URL
    finally:
        broker.flushdb()
        broker.close()


def entry_point(args: list[str], env: dict[str, str]) -> str:
    """Run ``python ARGS`` from the repository root; its stdout (fails on a non-zero exit)."""
    done = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(params=["embedded", "postgresql+redis"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    """Migrations, an API key, uvicorn and one Celery worker, on fresh state."""
    env = {
        "DISTILL_STORAGE_URL": f"file://{tmp_path / 'artifacts'}",
        "DISTILL_WORK_DIR": str(tmp_path / "work"),
        "DISTILL_DEVICE": "cpu",
    }
    deferred = request.param != "embedded"
    if deferred:
        # The large-upload path: every upload here is over this, so workers inspect them.
        env["DISTILL_INLINE_INSPECTION_MAX_BYTES"] = str(64 * 1024)
    with backing_services(request.param, tmp_path) as (database_url, broker_url):
        env |= {"DISTILL_DATABASE_URL": database_url, "DISTILL_BROKER_URL": broker_url}
        entry_point(["-m", "alembic", "upgrade", "head"], env)
        key = entry_point(["-m", "app.cli", "create-api-key", "--tenant", "e2e"], env).strip()
        worker_log = tmp_path / "worker.log"
        with (
            uvicorn_server(env, tmp_path / "api.log") as api,
            celery_worker(env, worker_log) as worker,
        ):
            yield Service(api.base_url, key, worker, worker_log, deferred)


def follow(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """The job's events over SSE, from the first to the terminal one (the server then closes)."""
    events: list[dict[str, Any]] = []
    headers = {"Accept": "text/event-stream"}
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=JOB_DEADLINE_S
    ) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in stream.iter_lines():
            if line == "":
                if "data" in fields:
                    event = json.loads(fields["data"])
                    assert int(fields["id"]) == event["id"] and fields["event"] == event["type"]
                    events.append(event)
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
    return events


def accuracy(model: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX classifier run by onnxruntime."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float((outputs.argmax(axis=1) == y).mean())


def ranged(client: httpx.Client, url: str, size: int, parts: int = 5) -> bytes:
    """Download ``url`` in ``parts`` byte ranges and join them."""
    step = -(-size // parts)
    chunks = []
    for start in range(0, size, step):
        end = min(start + step, size) - 1
        part = client.get(url, headers={"Range": f"bytes={start}-{end}"})
        assert part.status_code == 206, part.text
        assert part.headers["content-range"] == f"bytes {start}-{end}/{size}"
        chunks.append(part.content)
    return b"".join(chunks)


def test_upload_submit_follow_and_download(service: Service, digits_case: Digits) -> None:
    with service.client() as client:
        assert client.get("/readyz").json()["status"] == "ready"
        model = client.post(
            "/v1/models", files={"file": ("teacher.onnx", digits_case.teacher_onnx)}
        )
        dataset = client.post(
            "/v1/datasets", files={"file": ("transfer.npz", digits_case.transfer_npz)}
        )
        assert model.status_code == dataset.status_code == 201, (model.text, dataset.text)
        first = "processing" if service.deferred else "ready"
        assert model.json()["status"] == dataset.json()["status"] == first

        spec = {
            "teacher_model_id": model.json()["id"],
            "dataset_id": dataset.json()["id"],
            "student": {"architecture": "auto", "compression": 10},
            "training": {"epochs": 60, "batch_size": 64, "learning_rate": 3e-3, "seed": 0},
        }
        submitted = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "e2e-1"})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]

        events = follow(client, job_id)
        ids = [e["id"] for e in events]
        assert ids == sorted(set(ids))
        statuses = [e["data"]["status"] for e in events if e["type"] in ("status", "terminal")]
        assert statuses == ["queued", "running", "succeeded"], service.worker_log.read_text()
        assert events[-1]["type"] == "terminal"
        fractions = [e["data"]["fraction"] for e in events if e["type"] == "progress"]
        assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0

        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded" and job["attempt"] == 1 and job["error"] is None
        teacher = client.get(f"/v1/models/{model.json()['id']}").json()
        assert teacher["status"] == "ready" and teacher["signature"]["num_classes"] == 10
        # Submitting again with the same key is the same job, not a second run.
        again = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "e2e-1"})
        assert again.json()["id"] == job_id and again.json()["status"] == "succeeded"

        listed = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
        onnx_meta = listed["student.onnx"]
        student = ranged(client, f"/v1/jobs/{job_id}/artifacts/student.onnx", onnx_meta["bytes"])
        assert hashlib.sha256(student).hexdigest() == onnx_meta["sha256"]

        x, y = digits_case.held_out_x, digits_case.held_out_y
        teacher_accuracy = accuracy(digits_case.teacher_onnx, x, y)
        student_accuracy = accuracy(student, x, y)
        print(f"held-out accuracy: teacher {teacher_accuracy:.3f}, student {student_accuracy:.3f}")
        assert teacher_accuracy > 0.9
        assert student_accuracy >= teacher_accuracy - 0.05

        metrics_body = client.get(f"/v1/jobs/{job_id}/artifacts/metrics.json").content
        assert hashlib.sha256(metrics_body).hexdigest() == listed["metrics.json"]["sha256"]
        metrics = json.loads(metrics_body)
        validate_metrics(metrics)
        assert metrics["task"] == "classification"
        assert metrics["student"]["parameters"] * 5 < metrics["teacher"]["parameters"]
        assert metrics["fidelity"]["agreement"] > 0.9
        assert job["metrics"] == metrics
    assert service.worker.poll() is None, service.worker_log.read_text()


@pytest.mark.parametrize("service", ["embedded"], indirect=True)
def test_sigterm_hands_a_running_job_back_on_the_embedded_broker(
    service: Service, digits_case: Digits, tmp_path: Path
) -> None:
    # The filesystem broker runs Celery's threaded pool, whose processes get their signal
    # handlers replaced by billiard: the hand-back must survive that (the fault tests
    # cover Redis).
    with service.client() as client:
        model = client.post("/v1/models", files={"file": ("t.onnx", digits_case.teacher_onnx)})
        dataset = client.post("/v1/datasets", files={"file": ("d.npz", digits_case.transfer_npz)})
        spec = {
            "teacher_model_id": model.json()["id"],
            "dataset_id": dataset.json()["id"],
            "training": {"epochs": 1000, "batch_size": 16, "checkpoint_every_steps": 50},
        }
        job_id = client.post("/v1/jobs", json=spec).json()["id"]

        def logged(kind: str) -> list[dict[str, Any]]:
            page = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()
            return [e for e in page["data"] if e["type"] == kind]

        wait_until(lambda: logged("checkpoint"), "a checkpoint", JOB_DEADLINE_S)
        service.worker.terminate()
        assert service.worker.wait(timeout=60) == 0, service.worker_log.read_text()
        back = client.get(f"/v1/jobs/{job_id}").json()
        assert back["status"] == "queued", service.worker_log.read_text()
        assert logged("status")[-1]["data"]["reason"] == "worker_shutdown"
        checkpoints = tmp_path / "work" / "jobs" / job_id.replace("-", "") / "checkpoints"
        assert (checkpoints / "attempt-1" / "latest").is_file()
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"

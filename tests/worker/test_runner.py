"""A job's run in the worker, called in-process: the claim, the engine, the artifacts, the end.

The Celery task only calls :func:`execute_job` with the id; here the test calls
it directly (in a thread where the API must act meanwhile) on the test's own
database and storage. The end-to-end tests run it under a real Celery worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import utcnow
from app.jobs.models import Job
from app.storage import LocalStorage
from tests.app.conftest import Tenants
from tests.app.factories import broker_folder, npz_dataset, queued_job_ids, tiny_onnx_classifier
from tests.app.servers import wait_until
from worker.engine.evaluation import validate_metrics
from worker.lifecycle import handback_requested
from worker.reconciler import reconcile
from worker.runner import execute_job

DEADLINE_S = 120
#: How long a cancelled run may take to end once the request is in (as in test_time_limits).
CANCEL_BOUND_S = 15


@pytest.fixture
def submit(client: TestClient, tenants: Tenants) -> Callable[..., dict[str, Any]]:
    """Submit a job of acme's on a fresh tiny teacher and transfer set; returns the job."""
    model = client.post(
        "/v1/models", headers=tenants.acme, files={"file": ("t.onnx", tiny_onnx_classifier())}
    ).json()
    dataset = client.post(
        "/v1/datasets", headers=tenants.acme, files={"file": ("d.npz", npz_dataset(rows=120))}
    ).json()

    def submit(**spec: Any) -> dict[str, Any]:
        body = {"teacher_model_id": model["id"], "dataset_id": dataset["id"], **spec}
        response = client.post("/v1/jobs", headers=tenants.acme, json=body)
        assert response.status_code == 202, response.text
        return response.json()

    return submit


def events(client: TestClient, tenants: Tenants, job_id: str) -> list[dict[str, Any]]:
    return client.get(
        f"/v1/jobs/{job_id}/events", headers=tenants.acme, params={"limit": 1000}
    ).json()["data"]


@contextmanager
def running(
    client: TestClient, tenants: Tenants, job_id: str, settings: Settings, *, until: str
) -> Iterator[threading.Thread]:
    """The job run by :func:`execute_job` in a thread, once it logged an ``until`` event.

    The thread is joined on exit (a test makes it stop before then).
    """
    runner = threading.Thread(target=execute_job, args=(job_id, settings))
    runner.start()
    try:
        wait_until(
            lambda: any(e["type"] == until for e in events(client, tenants, job_id)),
            f"a {until} event",
            DEADLINE_S,
        )
        yield runner
        runner.join(DEADLINE_S)
        assert not runner.is_alive()
    finally:
        runner.join(DEADLINE_S)


def test_a_job_runs_to_success_with_checksummed_artifacts(
    client: TestClient,
    tenants: Tenants,
    submit: Callable[..., dict[str, Any]],
    settings: Settings,
    storage: LocalStorage,
) -> None:
    job = submit(training={"epochs": 3, "batch_size": 32}, export={"quantize": ["int8"]})
    execute_job(job["id"], settings)

    done = client.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 1 and done["error"] is None and done["partial"] is False
    assert done["progress"]["fraction"] == 1.0 and done["stop_reason"] == "completed"
    validate_metrics(done["metrics"])
    assert done["metrics"]["quantized"]["int8"]["file_bytes"] > 0

    artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts", headers=tenants.acme).json()["data"]
    names = {a["name"] for a in artifacts}
    assert names == {
        "student.onnx",
        "student.int8.onnx",
        "student.safetensors",
        "student_config.json",
        "metrics.json",
        "model_card.md",
        "training_curves.png",
    }
    for artifact in artifacts:
        body = client.get(
            f"/v1/jobs/{job['id']}/artifacts/{artifact['name']}", headers=tenants.acme
        )
        assert body.status_code == 200
        assert hashlib.sha256(body.content).hexdigest() == artifact["sha256"]
        assert len(body.content) == artifact["bytes"]
        assert body.headers["content-type"].startswith(artifact["media_type"].split(";")[0])
        assert body.headers["etag"] == f'"{artifact["sha256"]}"'
        assert artifact["name"] in body.headers["content-disposition"]
    metrics = client.get(f"/v1/jobs/{job['id']}/artifacts/metrics.json", headers=tenants.acme)
    assert json.loads(metrics.content) == done["metrics"]

    log = events(client, tenants, job["id"])
    ids = [e["id"] for e in log]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    kinds = [e["type"] for e in log]
    assert kinds[:2] == ["status", "status"] and kinds[-1] == "terminal"
    assert kinds.count("terminal") == 1
    assert {"stage", "progress", "evaluation"} <= set(kinds)
    assert log[-1]["data"]["status"] == "succeeded"
    assert all(e["attempt"] == 1 for e in log[1:])
    # The work folder is gone; the store holds the inputs and the seven artifacts.
    assert not (settings.work_dir / "jobs").exists() or not any(
        (settings.work_dir / "jobs").iterdir()
    )
    assert len(storage.files()) == 2 + 7

    # A second delivery of the same message changes nothing.
    execute_job(job["id"], settings)
    assert client.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json() == done
    assert events(client, tenants, job["id"]) == log


def test_engine_errors_become_typed_job_errors(
    client: TestClient,
    tenants: Tenants,
    submit: Callable[..., dict[str, Any]],
    settings: Settings,
    storage: LocalStorage,
) -> None:
    job = submit(training={"epochs": 1})
    teacher_key = next(k for k in storage.files() if "/models/" in k)
    # The stored teacher is damaged after it was accepted.
    storage.path(teacher_key).write_bytes(b"\x08\x07garbage")
    execute_job(job["id"], settings)
    failed = client.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "teacher_invalid", failed["error"]
    assert failed["error"]["message"]
    terminal = events(client, tenants, job["id"])[-1]
    assert terminal["type"] == "terminal" and terminal["data"]["error"]["code"] == "teacher_invalid"
    assert client.get(f"/v1/jobs/{job['id']}/artifacts", headers=tenants.acme).json()["data"] == []


def test_cancelling_a_running_job_stops_it_at_a_step_and_keeps_its_checkpoint(
    client: TestClient, tenants: Tenants, submit: Callable[..., dict[str, Any]], settings: Settings
) -> None:
    job = submit(training={"epochs": 5000, "batch_size": 8, "checkpoint_every_steps": 50})
    with running(client, tenants, job["id"], settings, until="checkpoint"):
        asked = client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenants.acme)
        assert asked.json()["status"] == "cancelling"
        asked_at = time.monotonic()
    # The run stops at its next step, then exports and reports its best student.
    assert time.monotonic() - asked_at < CANCEL_BOUND_S
    ended = client.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert ended["status"] == "cancelled" and ended["finished_at"] is not None
    # Validated before the first checkpoint: the best student so far is kept, partial.
    assert ended["partial"] is True and ended["stop_reason"] == "cancelled", ended
    assert ended["metrics"]["partial"] is True and ended["error"] is None
    listed = client.get(f"/v1/jobs/{job['id']}/artifacts", headers=tenants.acme).json()["data"]
    assert "student.onnx" in {a["name"] for a in listed}
    kinds = [e["type"] for e in events(client, tenants, job["id"])]
    assert kinds[-1] == "terminal" and kinds.count("terminal") == 1
    statuses = [
        e["data"]["status"] for e in events(client, tenants, job["id"]) if "status" in e["data"]
    ]
    assert statuses == ["queued", "running", "cancelling", "cancelled"]
    checkpoints = settings.work_dir / "jobs" / job["id"].replace("-", "") / "checkpoints"
    assert (checkpoints / "attempt-1" / "latest").is_file()


def test_a_worker_shutting_down_hands_the_job_back_and_the_next_attempt_resumes(
    client: TestClient, tenants: Tenants, submit: Callable[..., dict[str, Any]], settings: Settings
) -> None:
    job = submit(training={"epochs": 60, "batch_size": 8, "checkpoint_every_steps": 20})
    try:
        with running(client, tenants, job["id"], settings, until="checkpoint"):
            handback_requested.set()
    finally:
        handback_requested.clear()
    back = client.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert back["status"] == "queued" and back["attempt"] == 1
    log = events(client, tenants, job["id"])
    assert log[-1]["type"] == "status" and log[-1]["data"]["reason"] == "worker_shutdown"
    checkpointed = max(e["data"]["step"] for e in log if e["type"] == "checkpoint")
    # The reconciler sends it again once the broker holds no message for it.
    (message,) = (broker_folder(settings) / "queue").glob("*.msg")
    message.unlink()  # the submission's, consumed by the run above
    later = utcnow() + timedelta(seconds=settings.resend_grace_s + 1)
    assert [str(i) for i in reconcile(settings, now=later).resent] == [job["id"]]
    assert queued_job_ids(broker_folder(settings)) == [job["id"]]

    # The next delivery runs attempt 2 from the last checkpoint, not from step 0.
    execute_job(job["id"], settings)
    done = client.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert done["status"] == "succeeded" and done["attempt"] == 2, done["error"]
    resumed = [e for e in events(client, tenants, job["id"]) if e["type"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["attempt"] == 2
    assert resumed[0]["data"]["step"] >= checkpointed > 0
    artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts", headers=tenants.acme).json()
    assert len(artifacts["data"]) == 6


def test_a_run_that_lost_its_job_stops_without_writing(
    client: TestClient,
    tenants: Tenants,
    submit: Callable[..., dict[str, Any]],
    settings: Settings,
    engine: sa.Engine,
) -> None:
    quick = settings.model_copy(update={"lease_seconds": 0.3})
    job = submit(training={"epochs": 3000, "batch_size": 8, "checkpoint_every_steps": 20})
    with running(client, tenants, job["id"], quick, until="checkpoint"):
        # Another worker took the job over (as the reconciler and a new claim would).
        with Session(engine) as session, session.begin():
            session.execute(
                update(Job).where(Job.id == uuid.UUID(job["id"])).values(attempt=Job.attempt + 1)
            )
        taken_over = max(e["id"] for e in events(client, tenants, job["id"]))
    after = [e for e in events(client, tenants, job["id"]) if e["id"] > taken_over]
    assert after == []
    still = client.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert still["status"] == "running" and still["attempt"] == 2
    # The job is not over: the checkpoints the next attempt resumes from are kept.
    checkpoints = quick.work_dir / "jobs" / job["id"].replace("-", "") / "checkpoints"
    assert (checkpoints / "attempt-1" / "latest").is_file()


def test_a_renewal_held_up_past_most_of_the_lease_is_logged(
    client: TestClient,
    tenants: Tenants,
    submit: Callable[..., dict[str, Any]],
    settings: Settings,
    engine: sa.Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    quick = settings.model_copy(update={"lease_seconds": 0.6})
    job = submit(training={"epochs": 5000, "batch_size": 8, "checkpoint_every_steps": 20})
    caplog.set_level(logging.WARNING, logger="worker.runner")
    with running(client, tenants, job["id"], quick, until="checkpoint"):
        # The job's row is locked for two leases: the renewal waits on it, as it would
        # on a host too busy to run the lease's thread in time.
        with Session(engine) as session, session.begin():
            session.execute(
                update(Job).where(Job.id == uuid.UUID(job["id"])).values(progress=Job.progress)
            )
            time.sleep(2 * quick.lease_seconds)
        asked = client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenants.acme)
        assert asked.json()["status"] == "cancelling"
    late = [r.getMessage() for r in caplog.records if "after the last renewal" in r.getMessage()]
    assert late, [r.getMessage() for r in caplog.records]
    assert "DISTILL_LEASE_SECONDS" in late[0]
    # Nothing took the job over meanwhile: the run itself ended it.
    ended = client.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert ended["status"] == "cancelled" and ended["attempt"] == 1


def test_the_servers_time_ceiling_ends_a_job_with_its_best_student_so_far(
    client: TestClient, tenants: Tenants, submit: Callable[..., dict[str, Any]], settings: Settings
) -> None:
    capped = settings.model_copy(update={"max_job_minutes": 0.02})  # 1.2 s
    job = submit(training={"epochs": 5000, "batch_size": 8, "max_minutes": 60})
    execute_job(job["id"], capped)
    ended = client.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert ended["status"] == "failed" and ended["partial"] is True
    assert ended["error"]["code"] == "time_budget_exceeded"
    assert ended["stop_reason"] == "time_budget"
    assert ended["metrics"]["partial"] is True
    log = events(client, tenants, job["id"])
    last_checkpoint = max(e["data"]["step"] for e in log if e["type"] == "checkpoint")
    assert last_checkpoint == ended["metrics"]["training"]["steps"]
    artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts", headers=tenants.acme).json()
    assert len(artifacts["data"]) == 6
    checkpoints = settings.work_dir / "jobs" / job["id"].replace("-", "") / "checkpoints"
    assert (checkpoints / "attempt-1" / "latest").is_file()

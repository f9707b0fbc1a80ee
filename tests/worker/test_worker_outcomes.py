"""Jobs run by a real Celery worker process, on PostgreSQL, submitted over the in-process API:
a job reported on the caller's test set, a job cancelled mid-training that keeps its best
student, and one cancelled during its evaluation that keeps its student unevaluated."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from tests.app.conftest import Tenants
from tests.app.factories import npz_dataset, tiny_onnx_classifier
from tests.app.servers import celery_worker, wait_until
from tests.worker.postgres import database_url, engine  # noqa: F401 - fixtures, by name
from tests.worker.test_time_limits import worker_env

pytestmark = pytest.mark.slow

#: How long a job may take to be claimed and to end (torch imports first).
JOB_S = 90.0
#: How long a cancelled job may take to end once the request is in.
CANCEL_BOUND_S = 15.0
TEST_ROWS = 37
#: Unlabelled test rows that make the evaluation last seconds (about 3 s alone on one core),
#: where the cancellation takes a poll of the event log and one request to land; within the
#: tests' upload limit.
EVALUATION_ROWS = 15_000


def upload(client: TestClient, tenants: Tenants, kind: str, name: str, data: bytes) -> str:
    created = client.post(f"/v1/{kind}", headers=tenants.acme, files={"file": (name, data)})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def job(client: TestClient, tenants: Tenants, job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=tenants.acme).json()
    return body


def ended(client: TestClient, tenants: Tenants, job_id: str) -> dict[str, Any] | None:
    found = job(client, tenants, job_id)
    return found if found["status"] in ("succeeded", "failed", "cancelled") else None


def downloaded_artifacts(client: TestClient, tenants: Tenants, job_id: str) -> dict[str, bytes]:
    """Every artifact of the job, each checked against its listed size and sha256."""
    listed = client.get(f"/v1/jobs/{job_id}/artifacts", headers=tenants.acme).json()["data"]
    files = {}
    for artifact in listed:
        body = client.get(f"/v1/jobs/{job_id}/artifacts/{artifact['name']}", headers=tenants.acme)
        assert body.status_code == 200, body.text
        assert hashlib.sha256(body.content).hexdigest() == artifact["sha256"]
        assert len(body.content) == artifact["bytes"]
        files[artifact["name"]] = body.content
    return files


def submit_with_test_set(client: TestClient, tenants: Tenants, rows: bytes) -> tuple[str, str]:
    """A short job of a tiny teacher on 120 transfer rows, tested on the uploaded ``rows``:
    ``(job id, test dataset id)``."""
    teacher = upload(client, tenants, "models", "t.onnx", tiny_onnx_classifier())
    transfer = upload(client, tenants, "datasets", "d.npz", npz_dataset(rows=120))
    test_set = upload(client, tenants, "datasets", "test.npz", rows)
    spec = {
        "teacher_model_id": teacher,
        "dataset_id": transfer,
        "training": {"epochs": 2, "batch_size": 32},
        "evaluation": {"test_dataset_id": test_set, "baseline": False},
    }
    submitted = client.post("/v1/jobs", headers=tenants.acme, json=spec)
    assert submitted.status_code == 202, submitted.text
    return str(submitted.json()["id"]), test_set


def test_a_job_reports_on_the_uploaded_test_set(
    client: TestClient, tenants: Tenants, settings: Settings, tmp_path: Path
) -> None:
    job_id, test_set = submit_with_test_set(client, tenants, npz_dataset(rows=TEST_ROWS, seed=5))
    with celery_worker(worker_env(settings), tmp_path / "worker.log"):
        done = wait_until(lambda: ended(client, tenants, job_id), "the job to end", JOB_S)
    assert done["status"] == "succeeded", done
    assert done["test_dataset_id"] == test_set
    metrics = json.loads(downloaded_artifacts(client, tenants, job_id)["metrics.json"])
    split = metrics["split"]
    assert split["test_source"] == "dataset", split
    assert split["test_rows"] == TEST_ROWS, split
    # Every transfer row trains or validates: none is held out for the test.
    assert split["train_rows"] + split["validation_rows"] == 120, split


def logged(client: TestClient, tenants: Tenants, job_id: str, kind: str) -> bool:
    page = client.get(
        f"/v1/jobs/{job_id}/events", headers=tenants.acme, params={"limit": 1000}
    ).json()
    return any(e["type"] == kind for e in page["data"])


def test_a_job_cancelled_mid_training_keeps_its_best_student(
    client: TestClient, tenants: Tenants, settings: Settings, tmp_path: Path
) -> None:
    teacher = upload(client, tenants, "models", "t.onnx", tiny_onnx_classifier())
    transfer = upload(client, tenants, "datasets", "d.npz", npz_dataset(rows=120))
    spec = {
        "teacher_model_id": teacher,
        "dataset_id": transfer,
        "training": {"epochs": 5000, "batch_size": 8, "max_minutes": 10},
    }
    submitted = client.post("/v1/jobs", headers=tenants.acme, json=spec)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    with celery_worker(worker_env(settings), tmp_path / "worker.log"):
        wait_until(lambda: logged(client, tenants, job_id, "evaluation"), "a validation", JOB_S)
        asked = time.monotonic()
        response = client.post(f"/v1/jobs/{job_id}/cancel", headers=tenants.acme)
        assert response.json()["status"] == "cancelling", response.text
        done = wait_until(lambda: ended(client, tenants, job_id), "the job to end", 60)
        took = time.monotonic() - asked
    assert took < CANCEL_BOUND_S, f"cancellation took {took:.1f} s"
    assert done["status"] == "cancelled", done
    assert done["partial"] is True and done["stop_reason"] == "cancelled", done
    assert done["error"] is None
    files = downloaded_artifacts(client, tenants, job_id)
    assert {
        "student.onnx",
        "student.safetensors",
        "student_config.json",
        "metrics.json",
        "model_card.md",
        "training_curves.png",
    } <= files.keys()
    metrics = json.loads(files["metrics.json"])
    assert metrics["partial"] is True and metrics["training"]["stop_reason"] == "cancelled"
    assert metrics == done["metrics"]
    page = client.get(f"/v1/jobs/{job_id}/events", headers=tenants.acme, params={"limit": 1000})
    terminal = page.json()["data"][-1]
    assert terminal["type"] == "terminal" and terminal["data"]["status"] == "cancelled"
    assert "student.onnx" in terminal["data"]["artifacts"]
    print(f"cancelled with its student {took:.2f} s after the request")


def stage_logged(client: TestClient, tenants: Tenants, job_id: str, stage: str) -> bool:
    page = client.get(
        f"/v1/jobs/{job_id}/events", headers=tenants.acme, params={"limit": 1000}
    ).json()
    return any(e["type"] == "stage" and e["data"].get("stage") == stage for e in page["data"])


def test_a_job_cancelled_during_its_evaluation_keeps_its_student_unevaluated(
    client: TestClient, tenants: Tenants, settings: Settings, tmp_path: Path
) -> None:
    rows = npz_dataset(rows=EVALUATION_ROWS, classes=None, seed=5)
    job_id, _ = submit_with_test_set(client, tenants, rows)
    with celery_worker(worker_env(settings), tmp_path / "worker.log"):
        wait_until(
            lambda: stage_logged(client, tenants, job_id, "evaluation"), "the evaluation", JOB_S
        )
        response = client.post(f"/v1/jobs/{job_id}/cancel", headers=tenants.acme)
        assert response.json()["status"] == "cancelling", response.text
        done = wait_until(lambda: ended(client, tenants, job_id), "the job to end", 60)
    assert done["status"] == "cancelled", done
    assert done["partial"] is True and done["stop_reason"] == "cancelled", done
    assert done["error"] is None and done["verdict"]["deployable"] is False, done
    metrics = done["metrics"]
    assert metrics["evaluated"] is False and metrics["cancelled_during"] == "evaluation", metrics
    assert not {"teacher", "student", "fidelity", "intervals"} & metrics.keys()
    files = downloaded_artifacts(client, tenants, job_id)
    assert {"student.onnx", "student.safetensors", "student_config.json"} <= files.keys()
    assert {"metrics.json", "model_card.md", "training_curves.png"} <= files.keys()
    assert json.loads(files["metrics.json"]) == metrics
    assert "cancelled during the evaluation" in files["model_card.md"].decode()
    log = client.get(
        f"/v1/jobs/{job_id}/events", headers=tenants.acme, params={"limit": 1000}
    ).json()["data"]
    assert not any(e["type"] == "evaluation" and e["data"].get("final") for e in log)
    statuses = [e["data"]["status"] for e in log if "status" in e["data"]]
    assert statuses == ["queued", "running", "cancelling", "cancelled"], statuses
    terminal = log[-1]
    assert terminal["type"] == "terminal", terminal
    assert terminal["data"]["partial"] is True and terminal["data"]["evaluated"] is False
    assert terminal["data"]["cancelled_during"] == "evaluation"
    assert terminal["data"]["verdict"]["deployable"] is False
    assert "student.onnx" in terminal["data"]["artifacts"]

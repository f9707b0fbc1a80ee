"""The run's verdict on the job, its terminal event and webhook; a cancelled run's student.

The engine runs for real on a tiny job; its result is then given the verdict
object the report writes (or the cancellation stop a cancelled run returns
with its best student so far), as the runner receives it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.config import Settings
from app.jobs.models import Job, JobEvent
from tests.app.conftest import Tenants
from tests.worker.test_runner import events, submit  # noqa: F401 - the fixture
from worker.engine import pipeline
from worker.runner import execute_job
from worker.webhook_delivery import payload

VERDICT = {
    "deployable": False,
    "reasons": ["accuracy 0.61 is below 0.99 of the teacher's 0.95"],
    "criteria": {"min_metric_ratio": 0.99},
    "caveats": ["the 40 test rows cannot settle min_agreement: (figures)"],
}


def engine_returning(monkeypatch: pytest.MonkeyPatch, change: Callable[[Any], None]) -> None:
    """Make the runner's engine call return the real result after ``change``."""
    real = pipeline.run

    def run(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        change(result)
        return result

    monkeypatch.setattr(pipeline, "run", run)


def test_the_verdict_reaches_the_job_the_terminal_event_and_the_webhook(
    client: TestClient,
    tenants: Tenants,
    submit: Callable[..., dict[str, Any]],  # noqa: F811
    settings: Settings,
    engine: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine_returning(monkeypatch, lambda result: result.metrics.update(verdict=VERDICT))
    job = submit(training={"epochs": 2, "batch_size": 32})
    execute_job(job["id"], settings)

    done = client.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert done["status"] == "succeeded", done["error"]
    assert done["verdict"] == VERDICT
    listed = client.get("/v1/jobs", headers=tenants.acme).json()["data"]
    assert [j["verdict"] for j in listed if j["id"] == job["id"]] == [VERDICT]
    terminal = events(client, tenants, job["id"])[-1]
    assert terminal["type"] == "terminal" and terminal["data"]["verdict"] == VERDICT

    with Session(engine) as session:
        row = session.get(Job, uuid.UUID(job["id"]))
        logged = session.get(JobEvent, terminal["id"])
        assert row is not None and logged is not None
        body = payload(logged, row)
    assert body["event"]["data"]["verdict"] == VERDICT


def test_a_report_without_a_verdict_object_leaves_the_job_without_one(
    client: TestClient,
    tenants: Tenants,
    submit: Callable[..., dict[str, Any]],  # noqa: F811
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine_returning(monkeypatch, lambda result: result.metrics.update(verdict="distilled"))
    job = submit(training={"epochs": 1, "batch_size": 32})
    execute_job(job["id"], settings)
    done = client.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert done["status"] == "succeeded" and done["verdict"] is None
    assert "verdict" not in events(client, tenants, job["id"])[-1]["data"]


def test_a_cancelled_run_that_returns_its_best_student_keeps_it_as_partial(
    client: TestClient,
    tenants: Tenants,
    submit: Callable[..., dict[str, Any]],  # noqa: F811
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def cancelled(result: Any) -> None:
        result.stop_reason, result.partial = "cancelled", True
        result.metrics.update(partial=True, verdict=VERDICT)

    engine_returning(monkeypatch, cancelled)
    job = submit(training={"epochs": 1, "batch_size": 32})
    execute_job(job["id"], settings)

    done = client.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert (done["status"], done["partial"], done["stop_reason"]) == (
        "cancelled",
        True,
        "cancelled",
    )
    assert done["error"] is None and done["verdict"] == VERDICT
    names = {
        a["name"]
        for a in client.get(f"/v1/jobs/{job['id']}/artifacts", headers=tenants.acme).json()["data"]
    }
    assert {"student.onnx", "metrics.json", "model_card.md"} <= names
    terminal = events(client, tenants, job["id"])[-1]
    assert terminal["data"]["status"] == "cancelled" and terminal["data"]["verdict"] == VERDICT

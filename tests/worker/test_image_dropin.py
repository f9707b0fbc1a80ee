"""An image classifier distilled over HTTP on the product's defaults, by a real Celery worker.

The teacher is a BatchNorm CNN trained to full quality on digit images and exported
by PyTorch's current exporter (graph and weights file, uploaded as one zip bundle);
the transfer set is a zip of PNG folders, one per class. The job names only the two
uploads. ``student.onnx`` comes back over HTTP, is checked against the artifact
listing's sha256, and is scored in onnxruntime on images that neither the teacher
nor the engine saw, fed with the teacher's own feed dict.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from tests.app.conftest import Tenants
from tests.app.servers import celery_worker, wait_until
from tests.worker.engine.factories import digit_cnn
from tests.worker.postgres import database_url, engine  # noqa: F401 - fixtures, by name
from tests.worker.test_time_limits import (
    worker_env,
)

pytestmark = pytest.mark.slow

#: How long the job may take from submission (worker start-up, torch imports, training).
JOB_DEADLINE_S = 300.0


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The service tests' settings, with room for the teacher's 0.4 MB bundle."""
    return settings.model_copy(update={"max_upload_bytes": 8 * 2**20})


def _signature(session: ort.InferenceSession) -> tuple[list[Any], list[Any]]:
    inputs = [(v.name, v.type, v.shape) for v in session.get_inputs()]
    outputs = [(v.name, v.type, v.shape) for v in session.get_outputs()]
    return inputs, outputs


def test_image_teacher_over_http_on_the_defaults_gives_a_drop_in_student(
    client: TestClient, tenants: Tenants, settings: Settings, tmp_path: Path
) -> None:
    case = digit_cnn()
    bundle = case.bundle(tmp_path / "teacher.zip")
    headers = tenants.acme
    model = client.post(
        "/v1/models", headers=headers, files={"file": ("teacher.zip", bundle.read_bytes())}
    )
    dataset = client.post(
        "/v1/datasets",
        headers=headers,
        files={"file": ("digits.zip", case.transfer_zip.read_bytes())},
    )
    assert model.status_code == dataset.status_code == 201, (model.text, dataset.text)
    assert model.json()["status"] == dataset.json()["status"] == "ready"
    inputs = model.json()["signature"]["inputs"]
    assert [i["name"] for i in inputs] == ["image"], inputs

    body = {"teacher_model_id": model.json()["id"], "dataset_id": dataset.json()["id"]}
    submitted = client.post("/v1/jobs", headers=headers, json=body)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]

    def finished() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    log = tmp_path / "worker.log"
    # A student this small trains fastest on one thread of a CPU shared with other jobs.
    with celery_worker(worker_env(settings), log):
        job = wait_until(finished, "the job to finish", JOB_DEADLINE_S)
    assert job["status"] == "succeeded", (job, log.read_text(errors="replace")[-3000:])

    listing = client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers).json()["data"]
    listed = {artifact["name"]: artifact for artifact in listing}
    assert "student.onnx.data" not in listed  # a small student is one self-contained file
    student_bytes = client.get(f"/v1/jobs/{job_id}/artifacts/student.onnx", headers=headers)
    assert student_bytes.status_code == 200
    content = student_bytes.content
    assert len(content) == listed["student.onnx"]["bytes"]
    assert hashlib.sha256(content).hexdigest() == listed["student.onnx"]["sha256"]
    metrics_body = client.get(f"/v1/jobs/{job_id}/artifacts/metrics.json", headers=headers)
    metrics = json.loads(metrics_body.content)
    assert job["metrics"] == metrics

    providers = ["CPUExecutionProvider"]
    teacher = ort.InferenceSession(str(case.teacher), providers=providers)
    student = ort.InferenceSession(content, providers=providers)
    assert _signature(student) == _signature(teacher)
    feed = {"image": case.held_out_images}
    y = case.held_out_labels
    teacher_accuracy = float(np.mean(teacher.run(None, feed)[0].argmax(1) == y))
    student_accuracy = float(np.mean(student.run(None, feed)[0].argmax(1) == y))
    print(
        f"held-out accuracy ({len(y)} images): teacher {teacher_accuracy:.4f} "
        f"student {student_accuracy:.4f}; engine's test split: teacher "
        f"{metrics['teacher']['accuracy']:.4f} student {metrics['student']['accuracy']:.4f}"
    )
    assert teacher_accuracy >= 0.97, teacher_accuracy
    assert student_accuracy >= teacher_accuracy - 0.01, (student_accuracy, teacher_accuracy)
    assert metrics["student"]["accuracy"] >= metrics["teacher"]["accuracy"] - 0.02
    assert metrics["verdict"]["deployable"] is True, metrics["verdict"]
    assert metrics["student"]["parameters"] < metrics["teacher"]["parameters"]
    assert metrics["speedup"] > 1.0

"""Uploads too large to inspect in the API: kept as ``processing``, inspected by a worker task.

The API here inspects nothing inline (its threshold is a few bytes). The test
calls the worker's :func:`inspect_input` itself, as the Celery task would, and
reads the messages the API and the task send from the filesystem broker folder.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.app.conftest import Tenants
from tests.app.factories import (
    broker_folder,
    npz_dataset,
    pickled_checkpoint,
    queued_job_ids,
    queued_tasks,
    tiny_onnx_classifier,
)
from tests.app.http import assert_problem
from worker.runner import execute_job
from worker.upload_inspection import inspect_input

INSPECT = "distillery.inspect_upload"


@pytest.fixture
def deferring(settings: Settings) -> Settings:
    """The test's settings with every upload of more than 16 bytes inspected by a worker."""
    return settings.model_copy(update={"inline_inspection_max_bytes": 16})


@pytest.fixture
def api(deferring: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(deferring), raise_server_exceptions=False) as client:
        yield client


def upload(api: TestClient, tenants: Tenants, kind: str, data: bytes) -> dict[str, Any]:
    response = api.post(f"/v1/{kind}", headers=tenants.acme, files={"file": ("f", data)})
    assert response.status_code == 201, response.text
    return response.json()


def test_large_uploads_are_processing_until_a_worker_inspects_them(
    api: TestClient, tenants: Tenants, deferring: Settings
) -> None:
    model = upload(api, tenants, "models", tiny_onnx_classifier())
    dataset = upload(api, tenants, "datasets", npz_dataset())
    assert model["status"] == dataset["status"] == "processing"
    assert model["signature"] is None and model["format"] == "onnx"
    assert dataset["summary"] is None and dataset["format"] == "npz"
    assert queued_tasks(broker_folder(deferring)) == [
        (INSPECT, ["models", model["id"]]),
        (INSPECT, ["datasets", dataset["id"]]),
    ]
    # Pickles are refused at once whatever their size: the first bytes say what they are.
    assert_problem(
        api.post(
            "/v1/models", headers=tenants.acme, files={"file": ("m.pt", pickled_checkpoint())}
        ),
        415,
        "unsupported_format",
    )

    # A job may name inputs still being inspected: it waits, unchecked and unclaimed.
    ids = {"teacher_model_id": model["id"], "dataset_id": dataset["id"]}
    job = api.post("/v1/jobs", headers=tenants.acme, json=ids).json()
    assert job["status"] == "queued" and job["task"] is None
    execute_job(job["id"], deferring)
    waiting = api.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert waiting["status"] == "queued" and waiting["attempt"] == 0

    inspect_input("models", model["id"], deferring)
    inspect_input("models", model["id"], deferring)  # a second delivery changes nothing
    ready = api.get(f"/v1/models/{model['id']}", headers=tenants.acme).json()
    assert ready["status"] == "ready" and ready["signature"]["num_classes"] == 3
    assert queued_job_ids(broker_folder(deferring)) == [job["id"]]  # only the submission's message

    inspect_input("datasets", dataset["id"], deferring)
    summary = api.get(f"/v1/datasets/{dataset['id']}", headers=tenants.acme).json()
    assert summary["status"] == "ready" and summary["rows"] == 60
    # Both inputs ready: the job was checked and sent again.
    assert queued_job_ids(broker_folder(deferring)) == [job["id"], job["id"]]
    released = api.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert released["status"] == "queued" and released["task"] == "classification"


def test_an_invalid_upload_fails_the_jobs_waiting_for_it(
    api: TestClient, tenants: Tenants, deferring: Settings
) -> None:
    # Starts like an ONNX ModelProto (field 1, ir_version), then is garbage.
    broken = upload(api, tenants, "models", b"\x08\x07" + b"\xff" * 64)
    assert broken["status"] == "processing"
    dataset = upload(api, tenants, "datasets", npz_dataset())
    inspect_input("datasets", dataset["id"], deferring)
    ids = {"teacher_model_id": broken["id"], "dataset_id": dataset["id"]}
    job = api.post("/v1/jobs", headers=tenants.acme, json=ids).json()

    inspect_input("models", broken["id"], deferring)
    model = api.get(f"/v1/models/{broken['id']}", headers=tenants.acme).json()
    assert model["status"] == "invalid" and model["error"]["code"] == "teacher_invalid"
    failed = api.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "model_invalid"
    events = api.get(f"/v1/jobs/{job['id']}/events", headers=tenants.acme).json()["data"]
    assert events[-1]["type"] == "terminal" and events[-1]["data"]["status"] == "failed"
    # Now that it is known to be invalid, new jobs on it are refused at submission.
    assert_problem(api.post("/v1/jobs", headers=tenants.acme, json=ids), 422, "model_invalid")


def test_a_released_job_that_does_not_fit_fails_with_the_engine_code(
    api: TestClient, tenants: Tenants, deferring: Settings
) -> None:
    model = upload(api, tenants, "models", tiny_onnx_classifier(features=4))
    wrong = upload(api, tenants, "datasets", npz_dataset(features=5))
    ids = {"teacher_model_id": model["id"], "dataset_id": wrong["id"]}
    job = api.post("/v1/jobs", headers=tenants.acme, json=ids).json()
    inspect_input("models", model["id"], deferring)
    inspect_input("datasets", wrong["id"], deferring)
    failed = api.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "dataset_invalid"
    assert failed["error"]["field"] == "dataset_id"
    assert queued_job_ids(broker_folder(deferring)) == [job["id"]]  # not sent again


def test_a_job_waits_for_its_test_set_and_fails_if_it_does_not_fit(
    api: TestClient, tenants: Tenants, deferring: Settings
) -> None:
    model = upload(api, tenants, "models", tiny_onnx_classifier(features=4))
    dataset = upload(api, tenants, "datasets", npz_dataset(features=4))
    inspect_input("models", model["id"], deferring)
    inspect_input("datasets", dataset["id"], deferring)
    fits, wrong = (upload(api, tenants, "datasets", npz_dataset(features=f)) for f in (4, 5))
    assert fits["status"] == wrong["status"] == "processing"
    jobs = [
        api.post(
            "/v1/jobs",
            headers=tenants.acme,
            json={
                "teacher_model_id": model["id"],
                "dataset_id": dataset["id"],
                "evaluation": {"test_dataset_id": test_set["id"]},
            },
        ).json()
        for test_set in (fits, wrong)
    ]
    assert [j["task"] for j in jobs] == [None, None]
    # Not claimed while the test set is inspected.
    execute_job(jobs[0]["id"], deferring)
    waiting = api.get(f"/v1/jobs/{jobs[0]['id']}", headers=tenants.acme).json()
    assert waiting["status"] == "queued" and waiting["attempt"] == 0

    inspect_input("datasets", fits["id"], deferring)
    inspect_input("datasets", wrong["id"], deferring)
    released, failed = (api.get(f"/v1/jobs/{j['id']}", headers=tenants.acme).json() for j in jobs)
    assert released["status"] == "queued" and released["task"] == "classification"
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "dataset_invalid"
    assert failed["error"]["field"] == "evaluation.test_dataset_id"
    # Sent once at submission, and the fitting one again once released.
    assert sorted(queued_job_ids(broker_folder(deferring))) == sorted(
        [jobs[0]["id"], jobs[1]["id"], jobs[0]["id"]]
    )


def test_an_invalid_test_set_fails_the_job_waiting_for_it_naming_the_field(
    api: TestClient, tenants: Tenants, deferring: Settings
) -> None:
    model = upload(api, tenants, "models", tiny_onnx_classifier())
    dataset = upload(api, tenants, "datasets", npz_dataset())
    inspect_input("models", model["id"], deferring)
    inspect_input("datasets", dataset["id"], deferring)
    # An .npz with no ``inputs`` array.
    buffer = io.BytesIO()
    np.savez(buffer, features=np.zeros((8, 4), np.float32))
    broken = upload(api, tenants, "datasets", buffer.getvalue())
    assert broken["status"] == "processing"
    spec = {
        "teacher_model_id": model["id"],
        "dataset_id": dataset["id"],
        "evaluation": {"test_dataset_id": broken["id"]},
    }
    job = api.post("/v1/jobs", headers=tenants.acme, json=spec).json()
    inspect_input("datasets", broken["id"], deferring)
    failed = api.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "dataset_invalid"
    assert failed["error"]["field"] == "evaluation.test_dataset_id"
    assert "test dataset" in failed["error"]["message"]
    # Known to be invalid now: refused at submission, naming the field.
    refused = assert_problem(
        api.post("/v1/jobs", headers=tenants.acme, json=spec), 422, "dataset_invalid"
    )
    assert refused["errors"][0]["field"] == "body.evaluation.test_dataset_id"

"""``evaluation.test_dataset_id`` at submission: a ready dataset of the same tenant that reads
like the transfer set, other than it, held from deletion while the job is active."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.config import Settings
from tests.app.conftest import Tenants
from tests.app.databases import count_rows
from tests.app.factories import broker_folder, npz_dataset, queued_job_ids
from tests.app.http import assert_problem

FIELD = "body.evaluation.test_dataset_id"


def upload(client: TestClient, headers: dict[str, str], name: str, data: bytes) -> str:
    created = client.post("/v1/datasets", headers=headers, files={"file": (name, data)})
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "ready", created.json()
    return str(created.json()["id"])


def with_test_set(inputs: dict[str, str], test_dataset_id: str) -> dict[str, Any]:
    return {**inputs, "evaluation": {"test_dataset_id": test_dataset_id}}


def test_a_job_names_a_test_set_of_its_tenant(
    client: TestClient, tenants: Tenants, inputs: dict[str, str], settings: Settings
) -> None:
    test_set = upload(client, tenants.acme, "test.npz", npz_dataset(rows=30, seed=1))
    response = client.post("/v1/jobs", headers=tenants.acme, json=with_test_set(inputs, test_set))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["test_dataset_id"] == test_set
    assert job["spec"]["evaluation"]["test_dataset_id"] == test_set
    assert job["task"] == "classification"
    assert queued_job_ids(broker_folder(settings)) == [job["id"]]


def _text_set() -> bytes:
    rows = [{"text": f"sample {i}", "label": i % 3} for i in range(30)]
    return "\n".join(json.dumps(r) for r in rows).encode()


@pytest.mark.parametrize(
    ("case", "code", "in_detail"),
    [
        ("unknown", "dataset_not_found", None),
        ("malformed", "dataset_not_found", None),
        ("other_tenant", "dataset_not_found", None),
        ("transfer_set", "test_set_is_transfer_set", "transfer set itself"),
        ("more_features", "dataset_invalid", "[5]"),
        ("text", "dataset_invalid", "text"),
    ],
)
def test_a_test_set_that_cannot_serve_is_refused_naming_the_field(
    client: TestClient,
    tenants: Tenants,
    inputs: dict[str, str],
    engine: sa.Engine,
    settings: Settings,
    case: str,
    code: str,
    in_detail: str | None,
) -> None:
    test_set = {
        "unknown": lambda: str(uuid.uuid4()),
        "malformed": lambda: "not-an-id",
        "other_tenant": lambda: upload(client, tenants.globex, "t.npz", npz_dataset(rows=30)),
        "transfer_set": lambda: inputs["dataset_id"],
        "more_features": lambda: upload(client, tenants.acme, "t.npz", npz_dataset(features=5)),
        "text": lambda: upload(client, tenants.acme, "t.jsonl", _text_set()),
    }[case]()
    response = client.post("/v1/jobs", headers=tenants.acme, json=with_test_set(inputs, test_set))
    body = assert_problem(response, 422, code)
    assert [e["field"] for e in body["errors"]] == [FIELD], body
    if in_detail is not None:
        assert in_detail in body["detail"], body
    # The same problem as for an unknown transfer set: another tenant's id reveals nothing.
    if case == "other_tenant":
        unknown = client.post(
            "/v1/jobs", headers=tenants.acme, json=with_test_set(inputs, str(uuid.uuid4()))
        ).json()
        assert body["title"] == unknown["title"] and test_set in body["detail"]
    assert count_rows(engine, "jobs") == 0
    assert queued_job_ids(broker_folder(settings)) == []


def test_the_test_set_of_an_active_job_cannot_be_deleted(
    client: TestClient, tenants: Tenants, inputs: dict[str, str]
) -> None:
    test_set = upload(client, tenants.acme, "test.npz", npz_dataset(rows=30, seed=1))
    job = client.post("/v1/jobs", headers=tenants.acme, json=with_test_set(inputs, test_set))
    url = f"/v1/datasets/{test_set}"
    assert_problem(client.delete(url, headers=tenants.acme), 409, "dataset_in_use")
    client.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=tenants.acme)
    assert client.delete(url, headers=tenants.acme).status_code == 204
    kept = client.get(f"/v1/jobs/{job.json()['id']}", headers=tenants.acme).json()
    assert kept["test_dataset_id"] is None and kept["status"] == "cancelled"
    assert kept["dataset_id"] == inputs["dataset_id"]

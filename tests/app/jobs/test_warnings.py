"""Pre-flight warnings over HTTP: in the 202 of ``POST /v1/jobs``, kept on the job."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.app.conftest import Tenants


@pytest.mark.parametrize(
    ("training", "expected"),
    [
        ({}, []),
        ({"epochs": 1500}, []),  # 54 training rows: one step an epoch
        ({"epochs": 3}, [("too_few_steps", "training.epochs")]),
        ({"max_steps": 10}, [("too_few_steps", "training.max_steps")]),
    ],
)
def test_the_202_carries_the_warnings_and_the_job_keeps_them(
    client: TestClient,
    tenants: Tenants,
    inputs: dict[str, str],
    training: dict[str, Any],
    expected: list[tuple[str, str]],
) -> None:
    response = client.post("/v1/jobs", headers=tenants.acme, json={**inputs, "training": training})
    assert response.status_code == 202, response.text
    job = response.json()
    assert [(w["code"], w["field"]) for w in job["warnings"]] == expected
    assert all(w["message"] for w in job["warnings"])
    assert job["verdict"] is None
    read = client.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert read["warnings"] == job["warnings"]
    listed = client.get("/v1/jobs", headers=tenants.acme).json()["data"]
    assert [j["warnings"] for j in listed] == [job["warnings"]]


def test_a_budget_too_short_for_the_floor_is_warned_about(
    client: TestClient, tenants: Tenants, inputs: dict[str, str]
) -> None:
    # A student asked to be as large as a small language model, on a minute's budget.
    body = {
        **inputs,
        "student": {"architecture": "mlp", "max_parameters": 50_000_000},
        "training": {"max_minutes": 0.5},
    }
    response = client.post("/v1/jobs", headers=tenants.acme, json=body)
    assert response.status_code == 202, response.text
    warnings = response.json()["warnings"]
    assert [(w["code"], w["field"]) for w in warnings] == [
        ("time_budget_short", "training.max_minutes")
    ]
    assert "0.5" in warnings[0]["message"]


def test_warnings_are_documented_in_the_openapi_schema(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert set(schema["JobWarning"]["properties"]) == {"code", "message", "field"}
    assert "warnings" in schema["JobOut"]["properties"]
    assert "verdict" in schema["JobOut"]["properties"]
    assert set(schema["JobVerdict"]["required"]) == {"deployable"}

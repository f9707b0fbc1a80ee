"""Fixtures of the job tests."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.app.conftest import Tenants
from tests.app.factories import npz_dataset, tiny_onnx_classifier


@pytest.fixture
def inputs(client: TestClient, tenants: Tenants) -> dict[str, str]:
    """A 4-feature, 3-class teacher (15 parameters) and a matching labelled 60-row transfer
    set of acme's, as the ids a job spec names."""
    model = client.post(
        "/v1/models", headers=tenants.acme, files={"file": ("t.onnx", tiny_onnx_classifier())}
    )
    dataset = client.post(
        "/v1/datasets", headers=tenants.acme, files={"file": ("d.npz", npz_dataset())}
    )
    assert model.status_code == dataset.status_code == 201
    return {"teacher_model_id": model.json()["id"], "dataset_id": dataset.json()["id"]}

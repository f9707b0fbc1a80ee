"""The application as a whole: import cost, health, readiness, unknown routes."""

from __future__ import annotations

import subprocess
import sys

import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.config import Settings
from app.errors import PROBLEM_JSON
from app.main import create_app
from tests.app.databases import REPO


def test_importing_the_app_does_not_import_torch() -> None:
    code = "import sys, app.main; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": "ok", "broker": "ok", "storage": "ok"},
    }


def test_readiness_fails_when_the_database_is_gone(client: TestClient) -> None:
    # Point the app's sessions at a database that cannot be opened.
    state = client.app.state  # type: ignore[attr-defined]
    state.session_factory.configure(bind=sa.create_engine("sqlite:////nonexistent/dir/x.db"))
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"].startswith("unavailable")


def test_unknown_routes_are_problems(client: TestClient) -> None:
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert response.json()["code"] == "not_found"


def test_openapi_documents_the_problem_responses(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    upload = spec["paths"]["/v1/models"]["post"]
    assert {"201", "401", "413", "415", "422"} <= upload["responses"].keys()
    assert "multipart/form-data" in upload["requestBody"]["content"]


def test_readiness_fails_when_the_broker_is_unreachable(settings: Settings) -> None:
    # Nothing listens on port 1 of loopback.
    app = create_app(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))
    with TestClient(app) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["broker"].startswith("unavailable") and checks["database"] == "ok"


def test_openapi_documents_every_error_as_a_problem(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in str(spec)
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            answers = operation["responses"]
            if path.startswith("/v1/"):
                assert "401" in answers, (method, path)
            for status, answer in answers.items():
                if status.startswith(("4", "5")) and "content" in answer:
                    assert PROBLEM_JSON in answer["content"], (method, path, status)
    assert "503" in spec["paths"]["/readyz"]["get"]["responses"]
    submit = spec["paths"]["/v1/jobs"]["post"]
    assert {"202", "401", "409", "422"} <= submit["responses"].keys()
    assert submit["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/JobSpec"
    )

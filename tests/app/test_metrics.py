"""``GET /metrics``: request counters by route template, jobs by status, and never buffering."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import anyio
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session
from starlette.types import Message, Scope

from app.auth.models import Tenant
from app.config import Settings
from app.errors import install_error_handlers
from app.jobs.models import FAILED, QUEUED, RUNNING, STATUSES, SUCCEEDED, Job
from app.main import create_app
from app.metrics import install_metrics
from tests.app.conftest import Tenants

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: TestClient) -> Samples:
    """Every sample ``/metrics`` reports, keyed by sample name and labels."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def requests_total(samples: Samples, method: str, route: str, status: int) -> float:
    """The value of ``distillery_http_requests_total`` for these labels (0 when absent)."""
    labels = frozenset({"method": method, "route": route, "status": str(status)}.items())
    return samples.get(("distillery_http_requests_total", labels), 0)


def jobs_by_status(samples: Samples) -> dict[str, float]:
    """``distillery_jobs`` as a mapping of status to count."""
    return {
        dict(labels)["status"]: value
        for (name, labels), value in samples.items()
        if name == "distillery_jobs"
    }


def test_requests_are_counted_by_route_template_and_status(
    client: TestClient, tenants: Tenants
) -> None:
    for _ in range(2):
        assert client.get("/v1/models", headers=tenants.acme).status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get(f"/v1/models/{uuid.uuid4()}", headers=tenants.acme).status_code == 404
    assert client.get("/v1/nothing-here").status_code == 404
    assert client.get("/v1/nothing/else").status_code == 404

    samples = scrape(client)
    assert requests_total(samples, "GET", "/v1/models", 200) == 2
    assert requests_total(samples, "GET", "/v1/models", 401) == 1
    # One label value per endpoint: the template, never the concrete id or unknown path.
    assert requests_total(samples, "GET", "/v1/models/{model_id}", 404) == 1
    assert requests_total(samples, "GET", "unmatched", 404) == 2
    routes = {
        dict(labels)["route"] for name, labels in samples if name.startswith("distillery_http")
    }
    assert routes == {"/v1/models", "/v1/models/{model_id}", "unmatched"}
    duration_count = (
        "distillery_http_request_duration_seconds_count",
        frozenset({"method": "GET", "route": "/v1/models"}.items()),
    )
    assert samples[duration_count] == 3

    # The scrape itself is counted once its response has been sent.
    assert requests_total(scrape(client), "GET", "/metrics", 200) == 1


def test_jobs_are_reported_for_every_status(client: TestClient, engine: sa.Engine) -> None:
    assert jobs_by_status(scrape(client)) == dict.fromkeys(STATUSES, 0)

    wanted = {QUEUED: 3, RUNNING: 1, SUCCEEDED: 2, FAILED: 1}
    with Session(engine) as session, session.begin():
        tenant = Tenant(name="initech")
        session.add(tenant)
        session.flush()
        for status, count in wanted.items():
            session.add_all(
                Job(tenant_id=tenant.id, status=status, spec={}, request_sha256="0" * 64)
                for _ in range(count)
            )

    assert jobs_by_status(scrape(client)) == {status: wanted.get(status, 0) for status in STATUSES}


def test_a_scrape_answers_while_the_database_is_down(
    client: TestClient, tenants: Tenants, caplog: pytest.LogCaptureFixture
) -> None:
    assert client.get("/v1/models", headers=tenants.acme).status_code == 200
    state = client.app.state  # type: ignore[attr-defined]
    state.session_factory.configure(bind=sa.create_engine("sqlite:////nonexistent/dir/x.db"))
    with caplog.at_level(logging.WARNING, logger="app.metrics"):
        samples = scrape(client)
    assert jobs_by_status(samples) == {}
    assert requests_total(samples, "GET", "/v1/models", 200) == 1
    assert "could not count jobs" in caplog.text


def test_every_app_has_its_own_registry(settings: Settings) -> None:
    first, second = create_app(settings), create_app(settings)
    assert first.state.metrics_registry is not second.state.metrics_registry
    try:
        with TestClient(first) as client:
            client.get("/healthz")
        with TestClient(second) as client:
            assert requests_total(scrape(client), "GET", "/healthz", 200) == 0
    finally:
        first.state.engine.dispose()
        second.state.engine.dispose()


def test_metrics_is_documented_under_health(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    assert operation["tags"] == ["health"]
    assert "security" not in operation


def test_unhandled_errors_are_counted_as_500() -> None:
    app = FastAPI()
    install_error_handlers(app)
    install_metrics(app)

    @app.get("/boom/{part}")
    def boom(part: str) -> None:
        raise RuntimeError(part)

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/boom/x").status_code == 500
        assert requests_total(scrape(client), "GET", "/boom/{part}", 500) == 1


def test_streamed_responses_pass_through_unbuffered() -> None:
    app = FastAPI()
    install_metrics(app)
    first_chunk_sent = anyio.Event()

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first"
            # Deadlocks (and times out) if a middleware holds the first chunk back.
            await first_chunk_sent.wait()
            yield b"second"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    sent: list[bytes] = []

    async def receive() -> Message:
        await anyio.sleep_forever()
        return {}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(message["body"])
            first_chunk_sent.set()

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/stream",
        "raw_path": b"/stream",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def main() -> None:
        with anyio.fail_after(5):
            await app(scope, receive, send)

    anyio.run(main)
    assert sent == [b"first", b"second"]
    registry = app.state.metrics_registry
    labels = {"method": "GET", "route": "/stream", "status": "200"}
    assert registry.get_sample_value("distillery_http_requests_total", labels) == 1

"""A poll of a remembered job is answered before routing, exactly as the route answers it.

PostgreSQL only: there the process hears every write of a job and remembers
each job's ETag and JSON until its next change (see :mod:`app.jobs.remembered_reads`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.auth.dependencies import current_principal
from app.config import Settings
from app.errors import Unauthorized
from app.main import create_app
from tests.app.conftest import Tenants
from tests.app.servers import wait_until
from tests.app.test_polling import queued_job

pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)

#: What each answer is compared on (the date and server headers come from the server).
_COMPARED = ("content-type", "content-length", "etag", "cache-control")


def _answer(response: Any) -> tuple[int, dict[str, str | None], bytes]:
    """What a client sees of ``response`` (a test client's)."""
    return (
        response.status_code,
        {name: response.headers.get(name) for name in _COMPARED},
        response.content,
    )


def _client(app: FastAPI, tenants: Tenants) -> Iterator[TestClient]:
    with TestClient(app, headers=tenants.acme) as client:
        wait_until(lambda: app.state.job_feed.live, "the change feed", 10)
        yield client


@pytest.fixture
def remembering(app: FastAPI, tenants: Tenants) -> Iterator[TestClient]:
    """A client of the application as configured: it remembers unchanged jobs."""
    yield from _client(app, tenants)


@pytest.fixture
def querying(settings: Settings, tenants: Tenants) -> Iterator[TestClient]:
    """A client of a second application that reads every job from the database."""
    yield from _client(create_app(settings.model_copy(update={"remember_jobs": False})), tenants)


def _refuse() -> None:
    raise Unauthorized("routed")


def test_a_remembered_read_is_the_routes_answer_without_routing(
    app: FastAPI,
    remembering: TestClient,
    querying: TestClient,
    tenants: Tenants,
    engine: sa.Engine,
) -> None:
    job_id = queued_job(engine, "acme")
    path = f"/v1/jobs/{job_id}"
    routed = _answer(querying.get(path))
    assert routed[0] == 200
    etag = routed[1]["etag"]
    assert etag is not None
    routed_304 = _answer(querying.get(path, headers={"If-None-Match": etag}))
    assert routed_304[0] == 304
    # The first read is routed (the key and the job are read), later ones are remembered.
    assert _answer(remembering.get(path)) == routed
    app.dependency_overrides[current_principal] = _refuse
    for _ in range(3):
        assert _answer(remembering.get(path)) == routed
        assert _answer(remembering.get(path, headers={"If-None-Match": etag})) == routed_304
        stale = remembering.get(path, headers={"If-None-Match": '"another"'})
        assert _answer(stale) == routed
    # Whatever is not a plain read of a remembered job of the key's tenant is routed.
    for routed_request in (
        remembering.get(path, params={"wait": 0}),
        remembering.get(path, headers=tenants.globex),
        remembering.get(path, headers={"Authorization": "Basic x"}),
        remembering.get(f"/v1/jobs/{uuid.uuid4()}"),
        remembering.get(path[:-1]),
    ):
        assert routed_request.status_code == 401
        assert routed_request.json()["detail"] == "routed"
    app.dependency_overrides.clear()
    # The answers are counted under the route, as routed ones are.
    metrics = remembering.get("/metrics").text
    counted = 'distillery_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="'
    assert f'{counted}200"}} 7.0' in metrics, metrics
    assert f'{counted}304"}} 3.0' in metrics, metrics


def test_a_key_held_past_its_cache_lifetime_is_read_again(
    app: FastAPI, remembering: TestClient, engine: sa.Engine
) -> None:
    job_id = queued_job(engine, "acme")
    path = f"/v1/jobs/{job_id}"
    assert remembering.get(path).status_code == 200
    cache = app.state.api_key_cache
    token = remembering.headers["Authorization"].removeprefix("Bearer ")
    assert cache.cached(token) is not None
    assert cache.cached(token + "x") is None  # a wrong secret of a held key id
    for key_id, entry in list(cache._entries.items()):
        cache._entries[key_id] = type(entry)(entry.secret_hash, entry.principal, 0.0)
    assert cache.cached(token) is None
    app.dependency_overrides[current_principal] = _refuse
    assert remembering.get(path).status_code == 401
    app.dependency_overrides.clear()
    assert remembering.get(path).status_code == 200
    assert cache.cached(token) is not None

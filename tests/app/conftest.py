"""Fixtures of the service tests: every test runs on SQLite and on PostgreSQL.

Each test session builds each database with ``alembic upgrade head``; each test
gets empty tables, its own storage folder and two tenants with API keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.auth.service import create_api_key
from app.config import Settings
from app.db import Base, build_engine
from app.main import create_app
from app.storage import LocalStorage
from tests.app.databases import alembic_config, fresh_database

#: The upload cap of the test apps: small, so over-cap bodies are cheap to send.
TEST_MAX_UPLOAD = 256 * 1024


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A migrated database of each kind, for the whole session."""
    with fresh_database(request.param, tmp_path_factory.mktemp("db")) as url:
        command.upgrade(alembic_config(url), "head")
        yield url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[sa.Engine]:
    """The tests' own engine on the session's database."""
    engine = build_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _empty_tables(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "engine" not in request.fixturenames:
        return
    engine: sa.Engine = request.getfixturevalue("engine")
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Settings on the session's database, with storage in the test's folder."""
    return Settings(
        database_url=database_url,
        broker_url=f"filesystem://{tmp_path / 'broker'}",
        storage_url=f"file://{tmp_path / 'artifacts'}",
        work_dir=tmp_path / "work",
        max_upload_bytes=TEST_MAX_UPLOAD,
    )


@pytest.fixture
def storage(settings: Settings) -> LocalStorage:
    """The storage the test app writes to."""
    return LocalStorage(settings.storage_root())


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    """A fresh application on the test's settings."""
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """An HTTP client talking to the application in-process."""
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@dataclass(frozen=True)
class Tenants:
    """Two tenants' bearer headers: resources of one are invisible to the other."""

    acme: dict[str, str]
    globex: dict[str, str]


@pytest.fixture
def tenants(engine: sa.Engine) -> Tenants:
    """Two tenants with one API key each."""
    headers = {}
    with Session(engine) as session, session.begin():
        for name in ("acme", "globex"):
            token = create_api_key(session, tenant_name=name).token
            headers[name] = {"Authorization": f"Bearer {token}"}
    return Tenants(**headers)

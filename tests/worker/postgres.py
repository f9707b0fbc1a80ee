"""A module's own PostgreSQL database for tests where a worker process and the API share it.

Import both fixtures into the module (``from tests.worker.postgres import database_url,
engine``): a module-scoped ``engine`` of its own matters, since a session-scoped engine
cached by an earlier module would write into another database than the one the app reads.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from app.db import build_engine
from tests.app.databases import fresh_database


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """PostgreSQL only, migrated: the worker process and the in-process API share it."""
    from alembic import command

    from tests.app.databases import alembic_config

    with fresh_database("postgresql", tmp_path_factory.mktemp("db")) as url:
        command.upgrade(alembic_config(url), "head")
        yield url


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[sa.Engine]:
    """The tests' own engine on the module's database."""
    engine = build_engine(database_url)
    yield engine
    engine.dispose()

"""Alembic: the migrations go up, down and up again, and match the models (``alembic check``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from tests.app.databases import alembic_config, fresh_database

TABLES = {
    "tenants",
    "api_keys",
    "models",
    "datasets",
    "jobs",
    "job_events",
    "job_artifacts",
    "webhook_deliveries",
}


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_upgrade_downgrade_upgrade_and_check(kind: str, tmp_path: Path) -> None:
    with fresh_database(kind, tmp_path) as url:
        config = alembic_config(url)
        command.upgrade(config, "head")
        assert _tables(url) == TABLES
        command.check(config)
        command.downgrade(config, "base")
        assert _tables(url) == set()
        command.upgrade(config, "head")
        assert _tables(url) == TABLES
        command.check(config)

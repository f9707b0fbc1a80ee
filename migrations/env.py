"""Alembic environment: migrates the database named by ``DISTILL_DATABASE_URL``."""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any, Literal

from alembic import context

import app.auth.models
import app.datasets.models
import app.jobs.models
import app.models.models
import app.webhooks.models  # noqa: F401 - registers the tables on the metadata
from app.config import get_settings
from app.db import Base, UTCDateTime, build_engine, normalize_database_url

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata
# A URL set by the caller (tests, tools) wins over the environment.
url = config.attributes.get("database_url") or get_settings().database_url


def render_item(kind: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Render the app's column types as plain SQLAlchemy ones, so migrations never import app."""
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations_offline() -> None:
    """Emit the SQL without a database connection (``alembic upgrade head --sql``)."""
    context.configure(
        url=normalize_database_url(url),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate over a live connection."""
    engine = build_engine(url)
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                # A batch ALTER rebuilds the table (copy, DROP, rename), and with foreign keys
                # on, SQLite's DROP first deletes every row, cascading into the tables that
                # reference it. The pragma only takes effect outside a transaction.
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.commit()
            # Batch mode lets later ALTERs work on SQLite, which rebuilds tables instead.
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=sqlite,
                compare_type=True,
                render_item=render_item,
            )
            with context.begin_transaction():
                context.run_migrations()
                if sqlite:
                    # What the switched-off foreign keys would have caught.
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"the migration broke foreign keys: {broken[:10]}")
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

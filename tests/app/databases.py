"""Fresh, migrated databases for the service tests: a SQLite file, or a PostgreSQL database.

PostgreSQL runs at 127.0.0.1:5432 with trust auth (user ``postgres``, else
``root``); each test session creates its own database there and drops it after.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic.config import Config

REPO = Path(__file__).resolve().parents[2]
PG_HOST = "127.0.0.1:5432"
PG_USERS = ("postgres", "root")
PG_ADMIN_DB = "test"


def alembic_config(database_url: str) -> Config:
    """The repository's alembic.ini, pointed at ``database_url``."""
    config = Config(str(REPO / "alembic.ini"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


def _pg_admin() -> tuple[sa.Engine, str]:
    errors = []
    for user in PG_USERS:
        engine = sa.create_engine(
            f"postgresql+psycopg://{user}@{PG_HOST}/{PG_ADMIN_DB}", isolation_level="AUTOCOMMIT"
        )
        try:
            with engine.connect():
                return engine, user
        except sa.exc.OperationalError as exc:
            errors.append(f"{user}: {exc.orig}")
            engine.dispose()
    raise RuntimeError(f"PostgreSQL at {PG_HOST} is not reachable: {errors}")


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database's URL; dropped on exit."""
    admin, user = _pg_admin()
    name = f"distillery_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://{user}@{PG_HOST}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def sqlite_database(folder: Path) -> Iterator[str]:
    """A new SQLite database file's URL under ``folder``."""
    yield f"sqlite:///{folder / f'distillery-{uuid.uuid4().hex[:8]}.db'}"


@contextmanager
def fresh_database(kind: str, folder: Path) -> Iterator[str]:
    """A new, empty database of ``kind`` (``sqlite`` or ``postgresql``)."""
    maker = postgres_database() if kind == "postgresql" else sqlite_database(folder)
    with maker as url:
        yield url


def count_rows(engine: sa.Engine, table: str) -> int:
    """How many rows ``table`` holds."""
    with engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


@contextmanager
def commits_refused(engine: sa.Engine, table: str) -> Iterator[None]:
    """Until exit, the database refuses to COMMIT any transaction that inserted into ``table``.

    A deferred constraint is checked only at COMMIT, so every statement and
    flush before it succeeds and the commit itself fails, as it does for real
    when a constraint, a serialization conflict or a lost connection stops it.
    PostgreSQL gets a deferred constraint trigger that raises; SQLite, which has
    no deferred triggers, a trigger that writes a row breaking a deferred
    foreign key.
    """
    if engine.dialect.name == "postgresql":
        install = [
            "CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'commit refused by the test'; END $$",
            f"CREATE CONSTRAINT TRIGGER refuse_commit AFTER INSERT ON {table} "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_commit()",
        ]
        remove = [f"DROP TRIGGER refuse_commit ON {table}", "DROP FUNCTION refuse_commit()"]
    else:
        install = [
            "CREATE TABLE refuse_commit_parent (id INTEGER PRIMARY KEY)",
            "CREATE TABLE refuse_commit_child (parent_id INTEGER "
            "REFERENCES refuse_commit_parent (id) DEFERRABLE INITIALLY DEFERRED)",
            f"CREATE TRIGGER refuse_commit AFTER INSERT ON {table} "
            "BEGIN INSERT INTO refuse_commit_child VALUES (1); END",
        ]
        remove = [
            "DROP TRIGGER refuse_commit",
            "DROP TABLE refuse_commit_child",
            "DROP TABLE refuse_commit_parent",
        ]
    with engine.begin() as conn:
        for statement in install:
            conn.execute(sa.text(statement))
    try:
        yield
    finally:
        with engine.begin() as conn:
            for statement in remove:
                conn.execute(sa.text(statement))

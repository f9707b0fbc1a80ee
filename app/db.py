"""The database: declarative base, engine, and the request's session.

The request's session commits when the endpoint returns and rolls back when it
raises; services only flush. :func:`app.main.create_app` builds the engine and
keeps the session factory on ``app.state``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import DateTime, Engine, MetaData, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

log = logging.getLogger(__name__)

#: Constraint names Alembic can rely on, the same on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC that always reads back timezone-aware.

    SQLite has no timezone type and returns naive values; this keeps the two
    databases' values comparable (cursors carry them).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    """Declarative base of every table: UUID primary key and a creation time."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while a worker process writes; writers wait for the
    # lock (busy_timeout) instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    if dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0] != "memory":
        cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def normalize_database_url(url: str) -> str:
    """``url`` with a driver SQLAlchemy can load: plain PostgreSQL URLs mean psycopg 3."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


def build_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets foreign keys on and its folder created."""
    url = normalize_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    return create_engine(url, pool_pre_ping=True)


_AFTER_COMMIT = "distillery.after_commit"
_AFTER_ROLLBACK = "distillery.after_rollback"


def after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run ``action`` once the session's transaction commits (dropped if it rolls back).

    For side effects that must not outlive a failed transaction: deleting a
    file, and later sending a task.
    """
    session.info.setdefault(_AFTER_COMMIT, []).append(action)


def after_rollback(session: Session, action: Callable[[], None]) -> None:
    """Run ``action`` if the session's transaction rolls back (dropped if it commits).

    Undoes side effects taken ahead of the commit, such as a file kept for a new row.
    """
    session.info.setdefault(_AFTER_ROLLBACK, []).append(action)


def _run_actions(session: Session, run: str, drop: str) -> None:
    actions = session.info.pop(run, [])
    session.info.pop(drop, None)
    for action in actions:
        try:
            action()
        except Exception:
            # The transaction's outcome stands; a failed cleanup is logged, not raised.
            log.exception("post-transaction action failed")


@event.listens_for(Session, "after_commit")
def _on_commit(session: Session) -> None:
    _run_actions(session, _AFTER_COMMIT, _AFTER_ROLLBACK)


@event.listens_for(Session, "after_rollback")
def _on_rollback(session: Session) -> None:
    _run_actions(session, _AFTER_ROLLBACK, _AFTER_COMMIT)


def get_session(request: Request) -> Iterator[Session]:
    """The request's session: commits when the endpoint returns, rolls back when it raises."""
    factory: sessionmaker[Session] = request.app.state.session_factory
    with factory() as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        session.commit()


#: The request's session; ``scope="function"`` commits before the response is sent,
#: so a client never sees a 2xx for a write that failed to commit.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

"""The database: declarative base, engine, and the request's session.

The request's session commits when the endpoint returns and rolls back when it
raises; services only flush. :func:`app.main.create_app` builds the engine and
keeps the session factory on ``app.state``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, Request, Response
from sqlalchemy import Connection, DateTime, Engine, MetaData, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    SessionTransaction,
    mapped_column,
    sessionmaker,
)
from sqlalchemy.types import TypeDecorator

from app.errors import DistilleryError, problem_response

log = logging.getLogger(__name__)
T = TypeVar("T")

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


def _begin_before_savepoint(connection: Connection, name: str) -> None:
    # pysqlite opens a transaction only before a write: a SAVEPOINT that comes first
    # would open it itself, and releasing that savepoint would COMMIT the writes made
    # in it ahead of the session's commit. BEGIN first, so it nests as it does elsewhere.
    dbapi_connection = connection.connection.dbapi_connection
    if dbapi_connection is not None and not dbapi_connection.in_transaction:
        dbapi_connection.execute("BEGIN")


def normalize_database_url(url: str) -> str:
    """``url`` with a driver SQLAlchemy can load: plain PostgreSQL URLs mean psycopg 3."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


def build_engine(
    url: str,
    *,
    pool_size: int = 5,
    max_overflow: int = 10,
    pool_timeout_s: float = 30.0,
    pre_ping: bool = True,
    autocommit: bool = False,
) -> Engine:
    """An engine for ``url``; SQLite gets foreign keys on, savepoints that nest, and its folder
    created.

    The API sizes the PostgreSQL pool from its settings and turns ``pre_ping`` off: a
    ping is a round trip per request, and a dead connection is instead replaced by the
    pool once it fails (with ``pool_recycle`` retiring old ones). An ``autocommit``
    engine serves single-statement reads: no BEGIN, no ROLLBACK when a connection goes
    back to the pool, and no isolation level switched at each checkout.
    """
    autocommit_options: dict[str, Any] = (
        {"isolation_level": "AUTOCOMMIT", "pool_reset_on_return": None} if autocommit else {}
    )
    url = normalize_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        sizing: dict[str, Any] = {}
        if parsed.database and parsed.database != ":memory:":
            sizing = {
                "pool_size": pool_size,
                "max_overflow": max_overflow,
                "pool_timeout": pool_timeout_s,
            }
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            **sizing,
            **autocommit_options,
        )
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "savepoint", _begin_before_savepoint)
        return engine
    return create_engine(
        url,
        pool_pre_ping=pre_ping,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout_s,
        pool_recycle=_RECYCLE_S,
        **autocommit_options,
    )


#: Seconds after which a pooled connection is replaced rather than reused.
_RECYCLE_S = 1800


class DatabaseBusy(DistilleryError):
    """Every database connection is busy for longer than the pool waits: try again shortly."""

    status = 503
    code = "database_busy"
    title = "Service busy"

    def __init__(self, detail: str = "the service is busy; retry after a second") -> None:
        super().__init__(detail, headers={"Retry-After": "1"})


def database_limiter(app: Any, name: str = "reads") -> anyio.CapacityLimiter:
    """The thread limiter of the application's database work called ``name``.

    As many threads as the pool has connections, so a thread that holds a
    connection never waits for one behind threads that wait for a connection.
    Requests hold connections only inside these threads: ``reads`` serves the
    short read path (one thread call per query), ``sessions`` finishes the
    request sessions (commit, rollback, close), so a session holding a
    connection always gets a thread to give it back.
    """
    limiters: dict[str, anyio.CapacityLimiter] | None = getattr(
        app.state, "database_limiters", None
    )
    if limiters is None:
        limiters = app.state.database_limiters = {}
    limiter = limiters.get(name)
    if limiter is None:
        settings = app.state.settings
        size = settings.database_pool_size + settings.database_max_overflow
        limiter = limiters[name] = anyio.CapacityLimiter(size)
    return limiter


async def run_database_call(app: Any, call: Callable[..., T], *args: Any) -> T:
    """``call(*args)`` in a ``reads`` database thread (see :func:`database_limiter`).

    :class:`DatabaseBusy` (503) rather than an ever longer queue when too many
    requests already wait for a thread, or when the pool has no connection in time.
    """
    limiter = database_limiter(app)
    if limiter.statistics().tasks_waiting >= app.state.settings.database_max_waiting:
        raise DatabaseBusy()
    try:
        return await anyio.to_thread.run_sync(call, *args, limiter=limiter)
    except PoolTimeout:
        raise DatabaseBusy() from None


async def _database_busy(_request: Request, exc: Exception) -> Response:
    return problem_response(DatabaseBusy().problem(), DatabaseBusy().headers)


def install_database_errors(app: Any) -> None:
    """Answer an exhausted pool anywhere in ``app`` with 503 and ``Retry-After``, not 500."""
    app.add_exception_handler(PoolTimeout, _database_busy)


_PENDING = "distillery.after_transaction"


@dataclass
class _PendingAction:
    """A side effect waiting for the outcome of the transaction it was registered in."""

    action: Callable[[], None]
    on_commit: bool
    #: Savepoints open when it was registered: it belongs to the innermost of them.
    depth: int


def _savepoint_depth(session: Session) -> int:
    depth, transaction = 0, session.get_nested_transaction()
    while transaction is not None:
        depth += transaction.nested
        transaction = transaction.parent
    return depth


def _register(session: Session, action: Callable[[], None], *, on_commit: bool) -> None:
    pending = _PendingAction(action, on_commit, _savepoint_depth(session))
    session.info.setdefault(_PENDING, []).append(pending)


def after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run ``action`` once the session's transaction commits (dropped if it rolls back).

    For side effects that must not outlive a failed transaction: sending a
    task, deleting a file. Registered inside a savepoint, it is dropped if that
    savepoint rolls back; releasing a savepoint runs nothing.
    """
    _register(session, action, on_commit=True)


def after_rollback(session: Session, action: Callable[[], None]) -> None:
    """Run ``action`` if the session's transaction rolls back (dropped if it commits).

    Undoes side effects taken ahead of the commit, such as a file kept for a new
    row. Registered inside a savepoint, it also runs if that savepoint rolls back.
    """
    _register(session, action, on_commit=False)


def _run(actions: list[_PendingAction]) -> None:
    for pending in actions:
        try:
            pending.action()
        except Exception:
            # The transaction's outcome stands; a failed side effect is logged, not raised.
            log.exception("post-transaction action failed")


@event.listens_for(Session, "after_commit")
def _on_commit(session: Session) -> None:
    depth = _savepoint_depth(session)
    pending: list[_PendingAction] = session.info.get(_PENDING, [])
    if depth > 0:
        # A released savepoint: its actions now wait for the enclosing transaction.
        for waiting in pending:
            waiting.depth = min(waiting.depth, depth - 1)
        return
    session.info.pop(_PENDING, None)
    _run([waiting for waiting in pending if waiting.on_commit])


@event.listens_for(Session, "after_rollback")
def _on_rollback(session: Session) -> None:
    depth = _savepoint_depth(session)
    pending: list[_PendingAction] = session.info.get(_PENDING, [])
    ended = [waiting for waiting in pending if waiting.depth >= depth]
    session.info[_PENDING] = [waiting for waiting in pending if waiting.depth < depth]
    _run([waiting for waiting in ended if not waiting.on_commit])


@event.listens_for(Session, "after_transaction_end")
def _on_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    # An outermost transaction that ended without a commit or a database rollback
    # (a failed COMMIT, a close) leaves nothing behind for the session's next one.
    if transaction.parent is None:
        session.info.pop(_PENDING, None)


async def get_session(request: Request) -> AsyncIterator[Session]:
    """The request's session: commits when the endpoint returns, rolls back when it raises
    or when the commit itself fails.

    Opening it touches no connection: the first query checks one out, so a request
    waiting on its body holds none. Commit, rollback and close run in the ``sessions``
    threads (:func:`database_limiter`), which never wait on the pool, so a session that
    holds a connection can always give it back.
    """
    factory: sessionmaker[Session] = request.app.state.session_factory
    limiter = database_limiter(request.app, "sessions")
    session = factory()
    try:
        yield session
        await anyio.to_thread.run_sync(session.commit, limiter=limiter)
    except BaseException:
        # After a failed COMMIT, SQLite keeps the transaction (and its write lock) open
        # on the pooled connection until it is rolled back.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(session.rollback, limiter=limiter)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(session.close, limiter=limiter)


#: The request's session; ``scope="function"`` commits before the response is sent,
#: so a client never sees a 2xx for a write that failed to commit.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

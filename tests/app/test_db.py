"""The transaction's side effects: :func:`after_commit` and :func:`after_rollback`, on SQLite
and PostgreSQL.

A side effect registered with :func:`after_commit` (sending a job, deleting a
file) must happen only once the database has committed for real: never after
a rollback, a failed COMMIT or the release of a savepoint.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.auth.models import Tenant
from app.db import after_commit, after_rollback
from tests.app.databases import commits_refused, count_rows


def add_tenant(session: Session) -> None:
    """Write a row, so the transaction holds a real database transaction."""
    session.add(Tenant(name=f"tenant-{uuid.uuid4().hex[:12]}"))
    session.flush()


def record(ran: list[str], name: str) -> Callable[[], None]:
    return lambda: ran.append(name)


def test_after_commit_runs_once_the_transaction_commits(engine: sa.Engine) -> None:
    ran: list[str] = []
    with Session(engine) as session:
        add_tenant(session)
        after_commit(session, record(ran, "committed"))
        after_rollback(session, record(ran, "rolled back"))
        session.flush()
        assert ran == []
        session.commit()
        assert ran == ["committed"]
        # Run once: the session's next transaction starts with nothing pending.
        add_tenant(session)
        session.commit()
    assert ran == ["committed"]


def test_after_rollback_runs_and_after_commit_never_when_the_transaction_rolls_back(
    engine: sa.Engine,
) -> None:
    ran: list[str] = []
    with Session(engine) as session:
        add_tenant(session)
        after_commit(session, record(ran, "committed"))
        after_rollback(session, record(ran, "rolled back"))
        session.rollback()
        assert ran == ["rolled back"]
        add_tenant(session)
        session.commit()
    assert ran == ["rolled back"]


def test_a_transaction_that_raises_runs_only_its_rollback_side(engine: sa.Engine) -> None:
    ran: list[str] = []
    with pytest.raises(LookupError), Session(engine) as session, session.begin():
        add_tenant(session)
        after_commit(session, record(ran, "committed"))
        after_rollback(session, record(ran, "rolled back"))
        raise LookupError
    assert ran == ["rolled back"]


def test_a_failed_commit_never_runs_after_commit(engine: sa.Engine) -> None:
    ran: list[str] = []
    with commits_refused(engine, "tenants"), Session(engine) as session:
        add_tenant(session)
        after_commit(session, record(ran, "committed"))
        with pytest.raises(sa.exc.DBAPIError):
            session.commit()
        session.rollback()
        # Nothing is left pending for the session's next transaction either.
        session.execute(sa.select(1))
        session.commit()
    assert ran == []


def test_a_released_savepoint_runs_nothing_until_the_transaction_commits(engine: sa.Engine) -> None:
    ran: list[str] = []
    with Session(engine) as session:
        add_tenant(session)
        after_commit(session, record(ran, "outer"))
        with session.begin_nested():
            add_tenant(session)
            after_commit(session, record(ran, "inside"))
        assert ran == []
        session.commit()
    assert ran == ["outer", "inside"]


def test_a_rolled_back_savepoint_drops_its_own_after_commit(engine: sa.Engine) -> None:
    ran: list[str] = []
    with Session(engine) as session:
        add_tenant(session)
        after_commit(session, record(ran, "outer"))
        after_rollback(session, record(ran, "outer rolled back"))
        savepoint = session.begin_nested()
        add_tenant(session)
        after_commit(session, record(ran, "inside"))
        after_rollback(session, record(ran, "inside rolled back"))
        savepoint.rollback()
        assert ran == ["inside rolled back"]
        session.commit()
    assert ran == ["inside rolled back", "outer"]


def test_a_savepoint_opened_before_any_write_commits_nothing_on_release(engine: sa.Engine) -> None:
    # SQLite's driver opens a transaction only before a write: a savepoint opened
    # first must still nest in the session's transaction, not commit on release.
    with Session(engine) as session:
        session.execute(sa.select(1))
        with session.begin_nested():
            add_tenant(session)
        assert count_rows(engine, "tenants") == 0
        session.rollback()
    assert count_rows(engine, "tenants") == 0

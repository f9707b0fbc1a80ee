"""Database sessions of a worker process: one engine per process, a session per task."""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import build_engine


@lru_cache(maxsize=4)
def _engine(url: str) -> Engine:
    # One engine per worker child; children are forked before any database use.
    return build_engine(url)


def worker_sessions(settings: Settings) -> sessionmaker[Session]:
    """Sessions on ``settings``' database for a task in a worker process.

    The task's session scope (``with factory() as session, session.begin():``)
    owns the transaction: it commits when the block ends, rolls back on error.
    """
    return sessionmaker(_engine(settings.database_url), expire_on_commit=False)

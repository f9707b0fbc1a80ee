"""Job change fan-out: one listener per process wakes every request waiting on a job.

Long polls (``GET /v1/jobs/{id}?wait=S``) and event streams wait on
:meth:`JobChangeFeed.subscribe` instead of querying the database in a loop.
Every write of a job's row or event log calls :func:`announce_job_change`:
on PostgreSQL a ``NOTIFY`` sent when the transaction commits, which one thread per
API process receives with ``LISTEN``. SQLite has no notifications: the embedded
feed reads the new rows of the event log every ``DISTILL_SSE_POLL_S`` instead,
one query per process however many clients wait.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import psycopg
from sqlalchemy import Connection, Engine, event, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, object_session

from app.db import after_commit
from app.jobs.models import Job, JobEvent

log = logging.getLogger(__name__)

#: The PostgreSQL channel of job changes; the payload is the job's id.
CHANNEL = "distillery_job_changes"
#: Seconds the listener waits before reconnecting after losing its connection.
_RECONNECT_S = 1.0
#: Event-log rows the embedded feed reads per pass.
_TAIL_BATCH = 1000


def announce_job_change(session: Session, job_id: uuid.UUID) -> None:
    """Tell every API process, once the session's transaction commits, that the job changed.

    PostgreSQL delivers ``NOTIFY`` only on commit and drops it on rollback, so a
    waiting client never wakes for a change that did not happen. On SQLite it is a
    no-op: the embedded feed reads the event log.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_notify(:channel, :job)"), {"channel": CHANNEL, "job": str(job_id)}
        )
    # This process's feeds forget the job's version at once: its own writes are seen by
    # its next read, without waiting for the notification to come round.
    after_commit(session, partial(_forget_everywhere, str(job_id)))


def _notify(connection: Connection, job_id: uuid.UUID) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(
            text("SELECT pg_notify(:channel, :job)"), {"channel": CHANNEL, "job": str(job_id)}
        )


@event.listens_for(Job, "after_update")
def _job_row_written(_mapper: Any, connection: Connection, job: Job) -> None:
    """An ORM write of a job row (one not made by ``JobRepository.transition``) is a change
    too: every process's remembered version of the job must go."""
    _notify(connection, job.id)
    session = object_session(job)
    if session is not None:
        after_commit(session, partial(_forget_everywhere, str(job.id)))


#: The feeds of this process (one per application).
_FEEDS: weakref.WeakSet[JobChangeFeed] = weakref.WeakSet()


def _forget_everywhere(job_id: str) -> None:
    for feed in list(_FEEDS):
        feed.forget(job_id)


#: Job versions a feed remembers at most (past it, it starts afresh); with their JSON, a
#: few KiB each.
MAX_VERSIONS = 20_000


@dataclass(frozen=True)
class _Version:
    """A job's ``(etag, status, JSON or None)`` for its tenant, true until ``change`` is set."""

    tenant_id: uuid.UUID
    version: tuple[str, str, bytes | None]
    change: asyncio.Event


class JobChangeFeed:
    """Per-process fan-out of job changes to the coroutines waiting on them.

    ``live`` is false while the feed cannot hear changes (not started, or its
    listener is reconnecting): waiters then fall back to polling.
    """

    def __init__(self, *, remember: bool = True) -> None:
        self._changes: weakref.WeakValueDictionary[str, asyncio.Event] = (
            weakref.WeakValueDictionary()
        )
        self.live = False
        #: Whether reads of jobs are remembered until their next change (when ``exact``).
        self.remembers = remember
        #: Whether every write of a job row is heard (PostgreSQL's NOTIFY, sent by each
        #: update of a job), so a remembered version stays true until the job's change.
        self.exact = False
        self._versions: dict[str, _Version] = {}
        _FEEDS.add(self)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, job_id: uuid.UUID) -> asyncio.Event:
        """An event set at the job's next change; take it *before* reading the job."""
        key = str(job_id)
        change = self._changes.get(key)
        if change is None:
            change = asyncio.Event()
            self._changes[key] = change
        return change

    def publish(self, job_id: str) -> None:
        """Wake everyone waiting on job ``job_id``."""
        change = self._changes.pop(job_id, None)
        if change is not None:
            change.set()

    def publish_all(self) -> None:
        """Wake every waiter (changes may have been missed); each reads its job again."""
        changes = list(self._changes.values())
        self._changes.clear()
        for change in changes:
            change.set()

    def remember(
        self,
        job_id: uuid.UUID,
        tenant_id: uuid.UUID,
        version: tuple[str, str, bytes | None],
        change: asyncio.Event,
    ) -> None:
        """Keep the job's ``(etag, status, JSON)`` as read after subscribing to ``change`` (the
        JSON None for a version-only read): it holds until ``change`` is set. Only an exact
        feed remembers."""
        if not (self.remembers and self.exact and self.live) or change.is_set():
            return
        key = str(job_id)
        known = self._versions.get(key)
        if version[2] is None and known is not None and known.version[:2] == version[:2]:
            version = known.version  # the same version, JSON already known
        if len(self._versions) >= MAX_VERSIONS:
            self._versions.clear()
        self._versions[key] = _Version(tenant_id, version, change)

    def forget(self, job_id: str) -> None:
        """Drop the job's remembered version (safe from any thread)."""
        self._versions.pop(job_id, None)

    def recall(
        self, job_id: uuid.UUID, tenant_id: uuid.UUID, *, full: bool
    ) -> tuple[str, str, bytes | None] | None:
        """The tenant's job's ``(etag, status, JSON)`` if nothing changed it since it was
        read (and its JSON was read, when ``full``)."""
        found = self._versions.get(str(job_id))
        if found is None or found.tenant_id != tenant_id:
            return None
        if found.change.is_set() or not (self.exact and self.live):
            self._versions.pop(str(job_id), None)
            return None
        if full and found.version[2] is None:
            return None
        return found.version

    @property
    def waiting(self) -> int:
        """How many jobs have a waiter."""
        return len(self._changes)

    def start(self, engine: Engine, poll_s: float) -> None:
        """Start listening: a LISTEN thread on PostgreSQL, an event-log reader on SQLite."""
        loop = asyncio.get_running_loop()
        if engine.dialect.name == "postgresql":
            url = make_url(str(engine.url.render_as_string(hide_password=False)))
            dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
            self._thread = threading.Thread(
                target=self._listen, args=(dsn, loop), name="job-change-listener", daemon=True
            )
            self.exact = True
            self._thread.start()
        else:
            self._task = loop.create_task(self._tail(engine, poll_s))

    async def stop(self) -> None:
        """Stop listening and wake every waiter."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
        if self._thread is not None:
            await anyio.to_thread.run_sync(self._thread.join, 5.0)
        self.live = False
        self.publish_all()

    def _listen(self, dsn: str, loop: asyncio.AbstractEventLoop) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    self.live = True
                    # Changes made while no one listened: everyone reads again.
                    loop.call_soon_threadsafe(self.publish_all)
                    while not self._stop.is_set():
                        for notice in connection.notifies(timeout=0.5):
                            loop.call_soon_threadsafe(self.publish, notice.payload)
            except (psycopg.Error, OSError) as exc:
                log.warning("job change listener lost its connection: %s", exc)
            except RuntimeError:
                return  # the event loop closed under us: the process is stopping
            self.live = False
            self._stop.wait(_RECONNECT_S)

    async def _tail(self, engine: Engine, poll_s: float) -> None:
        last = await anyio.to_thread.run_sync(_last_event_id, engine)
        self.live = True
        while True:
            await anyio.sleep(poll_s)
            try:
                last, changed = await anyio.to_thread.run_sync(_changed_since, engine, last)
            except Exception as exc:
                log.warning("job change feed could not read the event log: %s", exc)
                continue
            for job_id in changed:
                self.publish(job_id)


def _last_event_id(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.coalesce(func.max(JobEvent.id), 0))).scalar_one())


def _changed_since(engine: Engine, last: int) -> tuple[int, set[str]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(JobEvent.id, JobEvent.job_id)
            .where(JobEvent.id > last)
            .order_by(JobEvent.id)
            .limit(_TAIL_BATCH)
        ).all()
    if not rows:
        return last, set()
    return rows[-1][0], {str(job_id) for _, job_id in rows}


def feed_of(app: Any) -> JobChangeFeed:
    """The application's job change feed."""
    feed: JobChangeFeed = app.state.job_feed
    return feed

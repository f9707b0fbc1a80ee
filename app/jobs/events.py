"""A job's event log as Server-Sent Events.

The stream reads the database for events after the last one sent, so it
resumes from any event id and survives API restarts. Between reads it waits on
the process's :class:`~app.jobs.notifications.JobChangeFeed`, so an idle stream
costs no query at all; only while the feed is down does it poll every
``DISTILL_SSE_POLL_S``. It sends a keep-alive comment when idle, so proxies keep
the connection open, and ends after the ``terminal`` event.

Streams of one job wake together at its change and would each read the same
rows: :class:`SharedReads` makes one database read (and one serialisation) of
a job's events after a given id, whatever the number of streams that ask.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import run_database_call
from app.jobs.models import TERMINAL, Job, JobEvent
from app.jobs.notifications import feed_of
from app.jobs.repository import JobRepository
from app.jobs.schemas import JobEventOut

EVENT_STREAM = "text/event-stream"
#: Events read per database poll.
_BATCH = 500


def wants_event_stream(request: Request) -> bool:
    """Whether the client asked for Server-Sent Events rather than a JSON page."""
    return EVENT_STREAM in request.headers.get("accept", "")


def format_event(event: JobEvent) -> bytes:
    """One SSE message: the event's id, its type as the event name, and itself as JSON data."""
    body = JobEventOut.model_validate(event).model_dump_json()
    return f"id: {event.id}\nevent: {event.type}\ndata: {body}\n\n".encode()


@dataclass(frozen=True)
class _Read:
    """Events after an id, each as (id, type, SSE bytes); whether the job has finished."""

    events: list[tuple[int, str, bytes]]
    finished: bool


def _poll(factory: sessionmaker[Session], job_id: uuid.UUID, after: int) -> _Read:
    """Events after ``after``, and whether the job has finished (checked only when none came)."""
    with factory() as session:
        events = JobRepository(session).events_after(job_id, after, _BATCH)
        if events:
            return _Read([(e.id, e.type, format_event(e)) for e in events], False)
        status = session.get(Job, job_id)
        return _Read([], status is None or status.status in TERMINAL)


class SharedReads:
    """One database read of a job's events after an id, shared by every stream that asks
    while it is under way (the streams of a job all wake at once on its change)."""

    def __init__(self) -> None:
        self._reads: dict[tuple[uuid.UUID, int], asyncio.Future[_Read]] = {}
        #: Database reads made (for tests and benchmarks).
        self.reads = 0

    async def read(self, app: Any, job_id: uuid.UUID, after: int) -> _Read:
        """The job's events after ``after``: joins a read under way, else starts one."""
        key = (job_id, after)
        reading = self._reads.get(key)
        if reading is None:
            factory: sessionmaker[Session] = app.state.session_factory
            reading = asyncio.ensure_future(run_database_call(app, _poll, factory, job_id, after))
            self._reads[key] = reading
            reading.add_done_callback(lambda _: self._reads.pop(key, None))
            self.reads += 1
        # Shielded: one stream that closes must not cancel the read the others wait on.
        return await asyncio.shield(reading)


def shared_reads_of(app: Any) -> SharedReads:
    """The application's :class:`SharedReads`, made at its first use."""
    reads: SharedReads | None = getattr(app.state, "event_reads", None)
    if reads is None:
        reads = app.state.event_reads = SharedReads()
    return reads


async def event_stream(app: Any, job_id: uuid.UUID, after: int) -> AsyncIterator[bytes]:
    """The job's events after id ``after`` as SSE bytes, until its ``terminal`` event."""
    settings: Settings = app.state.settings
    reads = shared_reads_of(app)
    feed = feed_of(app)
    yield b"retry: 2000\n\n"
    last_write = time.monotonic()
    read = True
    while True:
        if read:
            changed = feed.subscribe(job_id)
            found = await reads.read(app, job_id, after)
            for event_id, event_type, message in found.events:
                yield message
                after = event_id
                if event_type == "terminal":
                    return
            if found.finished:
                # Resumed after the terminal event: nothing more will come.
                return
            if found.events:
                last_write = time.monotonic()
            if len(found.events) == _BATCH:
                continue
        left = settings.sse_keepalive_s - (time.monotonic() - last_write)
        if not feed.live:
            left = min(left, settings.sse_poll_s)
        with anyio.move_on_after(max(0.0, left)):
            await changed.wait()
        read = changed.is_set() or not feed.live
        if time.monotonic() - last_write >= settings.sse_keepalive_s:
            yield b": keep-alive\n\n"
            last_write = time.monotonic()

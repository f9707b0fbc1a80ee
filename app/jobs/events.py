"""A job's event log as Server-Sent Events.

The stream reads the database for events after the last one sent, so it
resumes from any event id and survives API restarts. Between reads it waits on
the process's :class:`~app.jobs.notifications.JobChangeFeed`, so an idle stream
costs no query at all; only while the feed is down does it poll every
``DISTILL_SSE_POLL_S``. It sends a keep-alive comment when idle, so proxies keep
the connection open, and ends after the ``terminal`` event.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
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


def _poll(
    factory: sessionmaker[Session], job_id: uuid.UUID, after: int
) -> tuple[Sequence[JobEvent], bool]:
    """Events after ``after``, and whether the job has finished (checked only when none came)."""
    with factory() as session:
        events = JobRepository(session).events_after(job_id, after, _BATCH)
        if events:
            return events, False
        status = session.get(Job, job_id)
        return events, status is None or status.status in TERMINAL


async def event_stream(app: Any, job_id: uuid.UUID, after: int) -> AsyncIterator[bytes]:
    """The job's events after id ``after`` as SSE bytes, until its ``terminal`` event."""
    settings: Settings = app.state.settings
    factory: sessionmaker[Session] = app.state.session_factory
    feed = feed_of(app)
    yield b"retry: 2000\n\n"
    last_write = time.monotonic()
    read = True
    while True:
        if read:
            changed = feed.subscribe(job_id)
            events, finished = await run_database_call(app, _poll, factory, job_id, after)
            for event in events:
                yield format_event(event)
                after = event.id
                if event.type == "terminal":
                    return
            if finished:
                # Resumed after the terminal event: nothing more will come.
                return
            if events:
                last_write = time.monotonic()
            if len(events) == _BATCH:
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

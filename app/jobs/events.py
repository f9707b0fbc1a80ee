"""A job's event log as Server-Sent Events.

The stream polls the database (off the event loop) for events after the last
one sent, so it resumes from any event id, survives API restarts and needs
nothing beyond the database. It sends a keep-alive comment when idle, so
proxies keep the connection open, and ends after the ``terminal`` event.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence

import anyio
import anyio.to_thread
from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.jobs.models import TERMINAL, Job, JobEvent
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


async def event_stream(
    factory: sessionmaker[Session], job_id: uuid.UUID, after: int, settings: Settings
) -> AsyncIterator[bytes]:
    """The job's events after id ``after`` as SSE bytes, until its ``terminal`` event."""
    yield b"retry: 2000\n\n"
    last_write = time.monotonic()
    while True:
        events, finished = await anyio.to_thread.run_sync(_poll, factory, job_id, after)
        for event in events:
            yield format_event(event)
            after = event.id
            if event.type == "terminal":
                return
        if finished:
            # Resumed after the terminal event: nothing more will come.
            return
        now = time.monotonic()
        if events:
            last_write = now
        elif now - last_write >= settings.sse_keepalive_s:
            yield b": keep-alive\n\n"
            last_write = now
        if len(events) < _BATCH:
            await anyio.sleep(settings.sse_poll_s)

"""Conditional and long polls of one job: ``If-None-Match`` and ``?wait=S``.

A poll holds a database connection only for the one query of each read (in a
``reads`` thread, see :func:`app.db.run_database_call`); while it waits it holds
nothing but a subscription to the process's :class:`JobChangeFeed`. On
PostgreSQL, whose feed hears every write of a job, the feed also remembers each
job's ETag and JSON as last read, until its next change: a poll of an
unchanged job, conditional or not, is answered without a query.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from functools import partial
from typing import Any

import anyio

from app.config import Settings
from app.db import run_database_call
from app.jobs import service
from app.jobs.models import TERMINAL
from app.jobs.notifications import feed_of

#: The longest a long poll waits (``?wait=``), in seconds.
MAX_WAIT_S = 60.0


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (weak comparison, as RFC 9110 asks)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in if_none_match.split(","))


def job_read_headers(etag: str) -> dict[str, str]:
    """The headers of every answer to a read of one job, 200 or 304."""
    return {"ETag": etag, "Cache-Control": "no-cache"}


async def poll_job(
    app: Any,
    *,
    tenant_id: uuid.UUID,
    job_id: str,
    wait_s: float,
    if_none_match: str | None,
) -> service.JobView:
    """The job as the client should see it; a view without ``body`` means 304.

    Without ``wait_s`` it answers at once. With it, it answers as soon as the job
    differs from the client's ``If-None-Match`` (or, without one, from what the
    first read saw), when the job is finished, or after ``wait_s`` seconds.
    """
    settings: Settings = app.state.settings
    feed = feed_of(app)
    ident = service.parse_job_id(job_id)
    deadline = time.monotonic() + wait_s
    seen: service.JobView | None = None
    while True:
        # Subscribed before reading: a change between the read and the wait still wakes us.
        changed = feed.subscribe(ident)
        full = seen is None and if_none_match is None
        view = await _view(app, tenant_id, job_id, changed, full=full)
        if view.body is not None:
            if wait_s <= 0 or view.status in TERMINAL:
                return view
            seen = view
        elif not etag_matches(if_none_match if seen is None else seen.etag, view.etag):
            return await _view(app, tenant_id, job_id, changed, full=True)
        left = deadline - time.monotonic()
        if left <= 0 or view.status in TERMINAL:
            return seen or view
        if not feed.live:
            left = min(left, settings.sse_poll_s)
        with anyio.move_on_after(left):
            await changed.wait()


async def _view(
    app: Any, tenant_id: uuid.UUID, job_id: str, changed: asyncio.Event, *, full: bool
) -> service.JobView:
    """The job as remembered by the feed when it has not changed since, else as read now
    (and remembered until its next change). ``changed`` was subscribed to before."""
    feed = feed_of(app)
    ident = service.parse_job_id(job_id)
    known = feed.recall(ident, tenant_id, full=full)
    if known is not None:
        # Unchanged since a read of this process: no query.
        etag, status, body = known
        return service.JobView(etag, status, body if full else None)
    view = await _read(app, tenant_id, job_id, full=full)
    feed.remember(ident, tenant_id, (view.etag, view.status, view.body), changed)
    return view


async def _read(app: Any, tenant_id: uuid.UUID, job_id: str, *, full: bool) -> service.JobView:
    return await run_database_call(
        app,
        partial(
            service.read_job_view,
            app.state.read_engine,
            tenant_id=tenant_id,
            job_id=job_id,
            full=full,
        ),
    )

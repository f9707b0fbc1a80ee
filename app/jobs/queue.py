"""Sending work to the workers: Celery messages that carry only ids (see :mod:`app.broker`)."""

from __future__ import annotations

import uuid
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from app.broker import INSPECT_UPLOAD, JOBS_QUEUE, RUN_JOB, create_producer
from app.config import Settings


class JobQueue:
    """The producer side of the job queue (the API, and workers sending follow-up work)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.celery: Celery = create_producer(settings)

    def send(self, job_id: uuid.UUID) -> None:
        """Queue job ``job_id`` for a worker (call it only after the job's row committed)."""
        self.celery.send_task(RUN_JOB, args=[str(job_id)], queue=JOBS_QUEUE)

    def inspect(self, kind: str, row_id: uuid.UUID) -> None:
        """Have a worker inspect an upload kept as ``processing`` (``models`` or ``datasets``)."""
        self.celery.send_task(INSPECT_UPLOAD, args=[kind, str(row_id)], queue=JOBS_QUEUE)

    def check(self) -> None:
        """Raise unless the broker accepts a connection now (readiness)."""
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=3)

    def close(self) -> None:
        """Release the broker connections."""
        self.celery.close()


def get_job_queue(request: Request) -> JobQueue:
    """The application's :class:`JobQueue`."""
    queue: JobQueue = request.app.state.job_queue
    return queue


JobQueueDep = Annotated[JobQueue, Depends(get_job_queue)]

"""Sending jobs to the workers: a Celery message that carries only the job's id."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, Request

from app.config import Settings
from worker.broker import INSPECT_UPLOAD, JOBS_QUEUE, RUN_JOB, create_celery


class JobQueue:
    """The producer side of the job queue (the API, and workers sending follow-up work)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.celery: Celery = create_celery(settings)

    def send(self, job_id: uuid.UUID) -> None:
        """Queue job ``job_id`` for a worker (call it only after the job's row committed)."""
        self.celery.send_task(RUN_JOB, args=[str(job_id)], queue=JOBS_QUEUE)

    def inspect(self, kind: str, row_id: uuid.UUID) -> None:
        """Have a worker inspect an upload kept as ``processing`` (``models`` or ``datasets``)."""
        self.celery.send_task(INSPECT_UPLOAD, args=[kind, str(row_id)], queue=JOBS_QUEUE)

    def pending(self) -> list[tuple[str, list[Any]]] | None:
        """(task name, args) of every message the broker still holds for the workers.

        Waiting messages, and on Redis also those delivered but not yet
        acknowledged. ``None`` for a broker whose queue cannot be read.
        """
        folder = self.settings.broker_folder()
        if folder is not None:
            return [_task_of(p.read_bytes()) for p in sorted((folder / "queue").glob("*.msg"))]
        if not self.settings.broker_url.startswith(("redis://", "rediss://")):
            return None
        with self.celery.connection_for_read() as connection:
            client = connection.default_channel.client
            waiting = [
                raw
                for key in client.scan_iter(f"{JOBS_QUEUE}*")
                for raw in client.lrange(key, 0, -1)
            ]
            unacked = [json.dumps(json.loads(raw)[0]) for raw in client.hvals("unacked")]
        return [_task_of(raw) for raw in [*waiting, *unacked]]

    def check(self) -> None:
        """Raise unless the broker accepts a connection now (readiness)."""
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=3)

    def close(self) -> None:
        """Release the broker connections."""
        self.celery.close()


def _task_of(envelope: bytes | str) -> tuple[str, list[Any]]:
    """The task name and args of one of kombu's JSON message envelopes."""
    message = json.loads(envelope)
    args = json.loads(base64.b64decode(message["body"]))[0]
    return message["headers"]["task"], args


def get_job_queue(request: Request) -> JobQueue:
    """The application's :class:`JobQueue`."""
    queue: JobQueue = request.app.state.job_queue
    return queue


JobQueueDep = Annotated[JobQueue, Depends(get_job_queue)]

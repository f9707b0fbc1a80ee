"""The reconciler: the database is the source of truth, the broker only a doorbell.

Run periodically (Celery beat in production, the embedded control worker under
``make serve``), it repairs what a dead worker or a restarted broker leaves:

- a running job whose lease expired goes back to the queue (its next attempt
  resumes from the last checkpoint), or fails once it has used up
  ``DISTILL_MAX_ATTEMPTS``; a ``cancelling`` one is simply ``cancelled``;
- a queued job with no message in the broker is sent again;
- an upload left ``processing`` with no inspection message is sent again.

Every change is a conditional update, so two reconcilers (or a reconciler and
a worker) racing on one job cannot both act on it.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy.orm import Session

from app.broker import INSPECT_UPLOAD, JOBS_QUEUE, RUN_JOB
from app.config import Settings, get_settings
from app.datasets.repository import DatasetRepository
from app.db import after_commit, utcnow
from app.jobs import service
from app.jobs.models import CANCELLED, CANCELLING, FAILED, LEASED, QUEUED, Job
from app.jobs.queue import JobQueue
from app.jobs.repository import JobRepository
from app.models.repository import ModelRepository
from worker.engine.spec import JobSpec
from worker.runner import hard_time_limit_s
from worker.sessions import worker_sessions

log = logging.getLogger(__name__)


@dataclass
class Reconciled:
    """What one pass did, by job or upload id."""

    requeued: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    cancelled: list[uuid.UUID] = field(default_factory=list)
    resent: list[uuid.UUID] = field(default_factory=list)
    reinspected: list[uuid.UUID] = field(default_factory=list)


def reconcile(settings: Settings | None = None, *, now: datetime | None = None) -> Reconciled:
    """One pass over expired leases, unsent jobs and uninspected uploads."""
    settings = settings or get_settings()
    now = now or utcnow()
    done = Reconciled()
    queue = JobQueue(settings)
    try:
        with worker_sessions(settings)() as session, session.begin():
            _expired_leases(session, queue, settings, now, done)
        pending = pending_messages(queue)
        if pending is None:
            return done
        with worker_sessions(settings)() as session, session.begin():
            grace = timedelta(seconds=settings.resend_grace_s)
            _unsent(session, queue, pending, now - grace, done)
    finally:
        queue.close()
    if any((done.requeued, done.failed, done.cancelled, done.resent, done.reinspected)):
        log.info("reconciled: %s", done)
    return done


def _expired_leases(
    session: Session, queue: JobQueue, settings: Settings, now: datetime, done: Reconciled
) -> None:
    for job in JobRepository(session).expired_leases(now):
        attempt = job.attempt
        lost = {"reason": "lease_expired", "lease_owner": job.lease_owner}
        cleared = {"lease_owner": None, "lease_expires_at": None}
        if job.status == CANCELLING:
            if service.change_status(
                session, job, CANCELLED, from_statuses=LEASED, fence=attempt, event=lost, **cleared
            ):
                done.cancelled.append(job.id)
        elif (limit := _past_hard_limit(session, job, settings, now)) is not None:
            failure: dict[str, str | None] = {
                "code": "time_budget_exceeded",
                "message": f"the job ran past the worker's hard time limit ({limit:.0f} s: "
                "training.max_minutes plus the server's grace) and its worker process was "
                "ended",
                "field": "training.max_minutes",
            }
            if _fail_lost(session, job, lost, failure):
                done.failed.append(job.id)
        elif attempt >= settings.max_attempts:
            failure = {
                "code": "max_attempts_exceeded",
                "message": f"the job's worker was lost {attempt} times "
                f"(DISTILL_MAX_ATTEMPTS is {settings.max_attempts})",
                "field": None,
            }
            if _fail_lost(session, job, lost, failure):
                done.failed.append(job.id)
        elif service.change_status(
            session, job, QUEUED, from_statuses=LEASED, fence=attempt, event=lost, **cleared
        ):
            done.requeued.append(job.id)
            after_commit(session, partial(queue.send, job.id))


def _fail_lost(
    session: Session, job: Job, lost: dict[str, Any], error: dict[str, str | None]
) -> bool:
    """Fail the job whose lease ran out (fenced by its attempt) with ``error``; whether it did."""
    return service.change_status(
        session,
        job,
        FAILED,
        from_statuses=LEASED,
        fence=job.attempt,
        event={**lost, "error": error},
        error=error,
        lease_owner=None,
        lease_expires_at=None,
    )


def _past_hard_limit(session: Session, job: Job, settings: Settings, now: datetime) -> float | None:
    """The attempt's hard time limit in seconds, when the attempt began longer ago than it.

    Such an attempt was ended by its limit (the kernel's deadline, when native code kept
    the limit's own thread from running): a new attempt would only run into it again.
    """
    limit = hard_time_limit_s(JobSpec.model_validate(job.spec), settings)
    started = JobRepository(session).attempt_started_at(job.id, job.attempt)
    if started is None or (now - started).total_seconds() <= limit:
        return None
    return limit


def _unsent(
    session: Session,
    queue: JobQueue,
    pending: list[tuple[str, list[Any]]],
    settled: datetime,
    done: Reconciled,
) -> None:
    # Rows changed after ``settled`` are left alone: their message may be on its way
    # (it is sent just after the commit).
    sent_jobs = {args[0] for task, args in pending if task == RUN_JOB and args}
    sent_inspections = {args[1] for task, args in pending if task == INSPECT_UPLOAD and args[1:]}
    for job in JobRepository(session).queued_unchanged_since(settled):
        if str(job.id) in sent_jobs or not _inputs_ready(session, job):
            continue
        done.resent.append(job.id)
        after_commit(session, partial(queue.send, job.id))
    uploads = (("models", ModelRepository(session)), ("datasets", DatasetRepository(session)))
    for kind, repository in uploads:
        for row in repository.processing_unchanged_since(settled):
            if str(row.id) not in sent_inspections:
                done.reinspected.append(row.id)
                after_commit(session, partial(queue.inspect, kind, row.id))


def _inputs_ready(session: Session, job: Job) -> bool:
    """Whether a worker could start the job now (else an inspection will release it)."""
    teacher, dataset = service.job_inputs(session, job)
    test_set = service.job_test_set(session, job)
    # A job with a deleted or invalid input is failed by the worker's claim: send it.
    return not any(
        row is not None and row.status == "processing" for row in (teacher, dataset, test_set)
    )


def pending_messages(queue: JobQueue) -> list[tuple[str, list[Any]]] | None:
    """(task name, args) of every message the broker still holds for the workers.

    Waiting messages, and on Redis also those delivered but not yet
    acknowledged. ``None`` for a broker whose queue cannot be read.
    """
    folder = queue.settings.broker_folder()
    if folder is not None:
        return [_task_of(p.read_bytes()) for p in sorted((folder / "queue").glob("*.msg"))]
    if not queue.settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    with queue.celery.connection_for_read() as connection:
        client = connection.default_channel.client
        waiting = [
            raw for key in client.scan_iter(f"{JOBS_QUEUE}*") for raw in client.lrange(key, 0, -1)
        ]
        unacked = [json.dumps(json.loads(raw)[0]) for raw in client.hvals("unacked")]
    return [_task_of(raw) for raw in [*waiting, *unacked]]


def _task_of(envelope: bytes | str) -> tuple[str, list[Any]]:
    """The task name and args of one of kombu's JSON message envelopes."""
    message = json.loads(envelope)
    args = json.loads(base64.b64decode(message["body"]))[0]
    return message["headers"]["task"], args

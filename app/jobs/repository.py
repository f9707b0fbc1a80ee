"""Queries of jobs, their events and their artifacts.

Jobs are read through their tenant; events and artifacts are read by the id of
a job already found that way. State changes are conditional updates (``WHERE
status = …``), so the API and a worker racing on one job cannot both win.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.jobs.models import QUEUED, Job, JobArtifact, JobEvent
from app.repository import TenantRepository


class JobRepository(TenantRepository[Job]):
    """Jobs of one session."""

    row_type = Job

    def by_idempotency_key(self, tenant_id: uuid.UUID, key: str) -> Job | None:
        """The tenant's job submitted with ``Idempotency-Key: key``, if any."""
        return self.session.scalars(
            select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
        ).one_or_none()

    def queued_using(self, column: Any, row_id: uuid.UUID) -> Sequence[Job]:
        """Queued jobs that reference ``row_id`` through ``column`` (all of the row's tenant)."""
        return self.session.scalars(
            select(Job).where(column == row_id, Job.status == QUEUED).order_by(Job.created_at)
        ).all()

    def active_using(self, column: Any, row_id: uuid.UUID, statuses: Collection[str]) -> bool:
        """Whether a job in one of ``statuses`` references ``row_id`` through ``column``."""
        found = self.session.scalars(
            select(Job.id).where(column == row_id, Job.status.in_(statuses)).limit(1)
        ).first()
        return found is not None


def transition(
    session: Session,
    job_id: uuid.UUID,
    *,
    from_statuses: Collection[str],
    fence: int | None = None,
    **values: Any,
) -> bool:
    """Set ``values`` on the job if its status is in ``from_statuses`` and its attempt is ``fence``.

    Returns whether the row changed. The update also takes the row's lock, which
    orders the job's events (see :func:`add_event`).
    """
    query = update(Job).where(Job.id == job_id, Job.status.in_(from_statuses))
    if fence is not None:
        query = query.where(Job.attempt == fence)
    result = session.execute(query.values(updated_at=utcnow(), **values))
    assert isinstance(result, CursorResult)
    return result.rowcount == 1


def lock_job(session: Session, job_id: uuid.UUID) -> None:
    """Take the job row's lock until the transaction ends, for an event with no state change."""
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())


def add_event(
    session: Session, job_id: uuid.UUID, type: str, data: dict[str, Any], *, attempt: int
) -> JobEvent:
    """Append an event to the job's log (flushed, so its id is known).

    Callers update the job's row (or :func:`lock_job` it) in the same transaction
    first: the row lock makes one job's events commit in id order, so a reader
    resuming after id N never misses an event that commits later with a smaller id.
    """
    event = JobEvent(job_id=job_id, type=type, data=data, attempt=attempt)
    session.add(event)
    session.flush()
    return event


def events_after(session: Session, job_id: uuid.UUID, after: int, limit: int) -> Sequence[JobEvent]:
    """Up to ``limit`` of the job's events with ids above ``after``, oldest first."""
    return session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > after)
        .order_by(JobEvent.id)
        .limit(limit)
    ).all()


def artifacts(session: Session, job_id: uuid.UUID) -> Sequence[JobArtifact]:
    """The job's artifacts, by name."""
    return session.scalars(
        select(JobArtifact).where(JobArtifact.job_id == job_id).order_by(JobArtifact.name)
    ).all()


def artifact(session: Session, job_id: uuid.UUID, name: str) -> JobArtifact | None:
    """The job's artifact ``name``, if it exists."""
    return session.scalars(
        select(JobArtifact).where(JobArtifact.job_id == job_id, JobArtifact.name == name)
    ).one_or_none()

"""Queries of jobs, their events and their artifacts.

Jobs are read through their tenant; events and artifacts are read by the id of
a job already found that way. The scans across tenants serve the worker side
(the reconciler) and the metrics. State changes are conditional updates
(``WHERE status = …``), so the API and a worker racing on one job cannot both win.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    CursorResult,
    RowMapping,
    func,
    or_,
    select,
    update,
)

from app.auth.models import Tenant
from app.datasets.models import Dataset
from app.db import utcnow
from app.jobs.models import LEASED, QUEUED, Job, JobArtifact, JobEvent
from app.jobs.notifications import announce_job_change
from app.models.models import TeacherModel
from app.pagination import Cursor
from app.repository import TenantRepository


def _uses(used: TeacherModel | Dataset) -> ColumnElement[bool]:
    """Jobs that reference the model or dataset ``used``: a dataset as their transfer set or
    as their test set."""
    if isinstance(used, TeacherModel):
        return Job.teacher_model_id == used.id
    return or_(Job.dataset_id == used.id, Job.test_dataset_id == used.id)


class JobRepository(TenantRepository[Job]):
    """Jobs, their events and their artifacts in one session."""

    row_type = Job
    what = "job"

    # ------------------------------------------------------------------ jobs

    def by_idempotency_key(self, tenant_id: uuid.UUID, key: str) -> Job | None:
        """The tenant's job submitted with ``Idempotency-Key: key``, if any."""
        return self.session.scalars(
            select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
        ).one_or_none()

    def page_by_status(
        self,
        tenant_id: uuid.UUID,
        *,
        statuses: Collection[str],
        limit: int,
        after: Cursor | None,
    ) -> tuple[Sequence[Job], Cursor | None]:
        """A page of the tenant's jobs in ``statuses`` (all when empty), newest first."""
        where = [Job.status.in_(statuses)] if statuses else []
        return self.list_page(tenant_id, limit=limit, after=after, where=where)

    def lock_submissions(self, tenant_id: uuid.UUID) -> None:
        """Hold the tenant's row until the transaction ends, so that the tenant's submissions
        count and insert one at a time (PostgreSQL; SQLite has one writer anyway)."""
        self.session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())

    def count_in(self, tenant_id: uuid.UUID, statuses: Collection[str]) -> int:
        """How many of the tenant's jobs are in ``statuses``."""
        query = select(func.count()).where(Job.tenant_id == tenant_id, Job.status.in_(statuses))
        return int(self.session.scalar(query) or 0)

    def queued_using(self, used: TeacherModel | Dataset) -> Sequence[Job]:
        """Queued jobs that reference the model or dataset ``used`` (all of its tenant)."""
        return self.session.scalars(
            select(Job).where(_uses(used), Job.status == QUEUED).order_by(Job.created_at)
        ).all()

    def any_using(self, used: TeacherModel | Dataset, statuses: Collection[str]) -> bool:
        """Whether a job in one of ``statuses`` references the model or dataset ``used``."""
        found = self.session.scalars(
            select(Job.id).where(_uses(used), Job.status.in_(statuses)).limit(1)
        ).first()
        return found is not None

    def attempt_of(self, job_id: uuid.UUID) -> int | None:
        """The job's current attempt; ``None`` once the job is deleted."""
        return self.session.scalars(select(Job.attempt).where(Job.id == job_id)).first()

    def transition(
        self,
        job_id: uuid.UUID,
        *,
        from_statuses: Collection[str],
        fence: int | None = None,
        **values: Any,
    ) -> bool:
        """Set ``values`` on the job if its status is in ``from_statuses`` and its attempt is
        ``fence``; whether the row changed.

        The update also takes the row's lock, which orders the job's events (see
        :meth:`add_event`).
        """
        query = update(Job).where(Job.id == job_id, Job.status.in_(from_statuses))
        if fence is not None:
            query = query.where(Job.attempt == fence)
        result = self.session.execute(query.values(updated_at=utcnow(), **values))
        assert isinstance(result, CursorResult)
        changed = result.rowcount == 1
        if changed:
            # Every write of the row, a lease renewal included, changes the job's ETag.
            announce_job_change(self.session, job_id)
        return changed

    def lock(self, job_id: uuid.UUID) -> None:
        """Take the job row's lock until the transaction ends, for an event with no state
        change."""
        self.session.execute(select(Job.id).where(Job.id == job_id).with_for_update())

    # ------------------------------------------------------------------ across tenants

    def attempt_started_at(self, job_id: uuid.UUID, attempt: int) -> datetime | None:
        """When attempt ``attempt`` of the job began: its first event (the claim)."""
        query = select(func.min(JobEvent.created_at)).where(
            JobEvent.job_id == job_id, JobEvent.attempt == attempt
        )
        started: datetime | None = self.session.scalar(query)
        return started

    def expired_leases(self, now: datetime) -> Sequence[Job]:
        """Leased jobs whose lease expired before ``now``, oldest expiry first.

        Their rows are locked; rows another transaction holds are skipped, so two
        reconcilers never act on one job.
        """
        return self.session.scalars(
            select(Job)
            .where(Job.status.in_(LEASED), Job.lease_expires_at < now)
            .order_by(Job.lease_expires_at)
            .with_for_update(skip_locked=True)
        ).all()

    def queued_unchanged_since(self, changed_before: datetime) -> Sequence[Job]:
        """Queued jobs of every tenant unchanged since ``changed_before``."""
        return self.session.scalars(
            select(Job).where(Job.status == QUEUED, Job.updated_at < changed_before)
        ).all()

    def count_by_status(self) -> dict[str, int]:
        """How many jobs of every tenant are in each status (absent statuses have none)."""
        rows = self.session.execute(select(Job.status, func.count()).group_by(Job.status))
        return {status: int(count) for status, count in rows}

    # ------------------------------------------------------------------ events

    def add_event(
        self, job_id: uuid.UUID, type: str, data: dict[str, Any], *, attempt: int
    ) -> JobEvent:
        """Append an event to the job's log (flushed, so its id is known).

        Callers update the job's row (or :meth:`lock` it) in the same transaction
        first: the row lock makes one job's events commit in id order, so a reader
        resuming after id N never misses an event that commits later with a smaller id.
        """
        event = JobEvent(job_id=job_id, type=type, data=data, attempt=attempt)
        self.session.add(event)
        self.session.flush()
        announce_job_change(self.session, job_id)
        return event

    def events_after(self, job_id: uuid.UUID, after: int, limit: int) -> Sequence[JobEvent]:
        """Up to ``limit`` of the job's events with ids above ``after``, oldest first."""
        return self.session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.id > after)
            .order_by(JobEvent.id)
            .limit(limit)
        ).all()

    # ------------------------------------------------------------------ artifacts

    def add_artifact(self, artifact: JobArtifact) -> None:
        """Stage a stored artifact's row."""
        self.session.add(artifact)

    def artifacts(self, job_id: uuid.UUID) -> Sequence[JobArtifact]:
        """The job's artifacts, by name."""
        return self.session.scalars(
            select(JobArtifact).where(JobArtifact.job_id == job_id).order_by(JobArtifact.name)
        ).all()

    def artifact(self, job_id: uuid.UUID, name: str) -> JobArtifact | None:
        """The job's artifact ``name``, if it exists."""
        return self.session.scalars(
            select(JobArtifact).where(JobArtifact.job_id == job_id, JobArtifact.name == name)
        ).one_or_none()


# ---------------------------------------------------------------------- the status read
# Core queries on a plain connection: a poll reads one row, with no session and no ORM.


class JobStatusReads:
    """The status read's queries, on a plain connection: one row, no session, no ORM."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def row(self, tenant_id: uuid.UUID, job_id: uuid.UUID) -> RowMapping | None:
        """Every column of the tenant's job ``job_id``, if it exists."""
        jobs = Job.__table__
        query = select(jobs).where(jobs.c.id == job_id, jobs.c.tenant_id == tenant_id)
        return self.connection.execute(query).mappings().first()

    def version(self, tenant_id: uuid.UUID, job_id: uuid.UUID) -> RowMapping | None:
        """What the tenant's job ``job_id`` looks like to a conditional read: ``status``,
        ``attempt`` and ``updated_at`` (which every write of the job sets)."""
        jobs = Job.__table__
        query = select(jobs.c.status, jobs.c.attempt, jobs.c.updated_at).where(
            jobs.c.id == job_id, jobs.c.tenant_id == tenant_id
        )
        return self.connection.execute(query).mappings().first()

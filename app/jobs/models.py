"""Tables of the jobs domain: jobs, their append-only event log, and their artifacts."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow
from app.tenancy import TenantOwned

QUEUED = "queued"
RUNNING = "running"
CANCELLING = "cancelling"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

#: Every status, in the order a job moves through them.
STATUSES = (QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED)
#: A job in one of these never changes again.
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
#: A job in one of these holds its teacher and dataset.
ACTIVE = frozenset({QUEUED, RUNNING, CANCELLING})
#: A job in one of these is held by the worker that claimed it, under a lease: only that
#: attempt may write to it.
LEASED = (RUNNING, CANCELLING)


class Job(TenantOwned, Base):
    """A distillation run of a teacher on a transfer set, as its spec describes.

    ``attempt`` counts the times a worker claimed the job. ``progress`` and
    ``metrics`` hold the latest figures the worker wrote; ``error`` holds a typed
    ``{code, message, field}`` once the job fails.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_id_idempotency_key"),
        Index("ix_jobs_tenant_id_status", "tenant_id", "status"),
    )

    # SET NULL: a finished job outlives its inputs; active jobs keep them from deletion.
    teacher_model_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("models.id", ondelete="SET NULL"), index=True
    )
    dataset_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), index=True
    )
    #: The dataset reported on instead of a test split (``evaluation.test_dataset_id``).
    test_dataset_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), index=True
    )
    status: Mapped[str] = mapped_column(String(16), default=QUEUED)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    task: Mapped[str | None] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: Pre-flight warnings ``[{code, message, field}]`` found when the job was checked.
    warnings: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    stop_reason: Mapped[str | None] = mapped_column(String(32))
    partial: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    #: sha256 of the canonical spec, to tell a replay from a reused Idempotency-Key.
    request_sha256: Mapped[str] = mapped_column(String(64))
    #: The worker running the current attempt, and until when it holds the job unless it
    #: renews the lease; a job whose lease expired is handed to another worker.
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


#: The largest event id either database stores (a signed 64-bit integer): a resume
#: point past it can name no event, and would overflow the query that compares with it.
MAX_EVENT_ID = 2**63 - 1


class JobEvent(Base):
    """One entry of a job's event log; ids grow monotonically, so they are resume cursors."""

    __tablename__ = "job_events"

    # An integer id (SQLite needs INTEGER for its rowid alias to autoincrement).
    id: Mapped[int] = mapped_column(  # type: ignore[assignment]
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


class JobArtifact(Base):
    """A file a job produced, stored under ``storage_key`` with its sha256."""

    __tablename__ = "job_artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_job_artifacts_job_id_name"),)

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(100))
    storage_key: Mapped[str] = mapped_column(String(512))

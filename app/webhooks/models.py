"""Tables of the webhooks domain: the outbox of deliveries to jobs' ``webhook_url``."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"

#: Every status of a delivery; ``delivered`` and ``failed`` are final.
STATUSES = (PENDING, DELIVERED, FAILED)


class WebhookDelivery(Base):
    """One job event to POST to one URL, written in the transaction that logged the event.

    A periodic task sends the pending ones whose ``next_attempt_at`` has come;
    each failed attempt pushes ``next_attempt_at`` back (exponential backoff)
    until the delivery succeeds or runs out of attempts.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "url", name="uq_webhook_deliveries_event_id_url"),
        # The due query: pending rows whose time has come.
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
    )

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    # The type of job_events.id, which SQLite needs as INTEGER.
    event_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("job_events.id", ondelete="CASCADE"),
    )
    url: Mapped[str] = mapped_column(String(2048))
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(1000))
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

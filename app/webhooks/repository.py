"""Queries of the webhook outbox: writing deliveries, taking due ones, recording attempts."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session, aliased

from app.webhooks.models import DELIVERED, PENDING, WebhookDelivery


class WebhookRepository:
    """Webhook deliveries in one session."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, delivery: WebhookDelivery) -> None:
        """Stage a new delivery; it commits or rolls back with the caller's transaction."""
        self.session.add(delivery)

    def get(self, delivery_id: uuid.UUID) -> WebhookDelivery | None:
        """The delivery ``delivery_id``, if it still exists (its job may have been deleted)."""
        return self.session.get(WebhookDelivery, delivery_id)

    def claim_due(self, now: datetime, *, hold_until: datetime) -> WebhookDelivery | None:
        """Take the next delivery due at ``now``, hiding it from others until ``hold_until``.

        A due delivery waits while an older pending one of the same job and URL
        exists, so a job's events reach a receiver in order. Taking it moves its
        ``next_attempt_at`` to ``hold_until``, which hides it from other workers;
        one that dies mid-attempt leaves it due again then.
        """
        candidate = aliased(WebhookDelivery)
        older = aliased(WebhookDelivery)
        due = (
            select(candidate.id)
            .where(
                candidate.status == PENDING,
                candidate.next_attempt_at <= now,
                ~exists().where(
                    older.job_id == candidate.job_id,
                    older.url == candidate.url,
                    older.status == PENDING,
                    older.event_id < candidate.event_id,
                ),
            )
            .order_by(candidate.next_attempt_at, candidate.event_id)
            .limit(1)
        )
        if self.session.get_bind().dialect.name == "postgresql":
            # Concurrent workers take different rows instead of waiting on each other.
            due = due.with_for_update(skip_locked=True, of=candidate)
        # One statement picks and takes the row: SQLite has no row locks, but runs it whole.
        taken = self.session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == due.scalar_subquery(),
                WebhookDelivery.status == PENDING,
                WebhookDelivery.next_attempt_at <= now,
            )
            .values(next_attempt_at=hold_until)
            .returning(WebhookDelivery.id)
        ).scalar_one_or_none()
        return None if taken is None else self.session.get_one(WebhookDelivery, taken)

    def record_attempt(
        self,
        delivery: WebhookDelivery,
        *,
        status: str,
        status_code: int | None,
        error: str | None,
        at: datetime,
        retry_at: datetime | None = None,
    ) -> None:
        """Count one more attempt of ``delivery`` made at ``at`` and what it got.

        ``status`` is where the delivery now stands; a ``pending`` one is due
        again at ``retry_at``.
        """
        delivery.attempts += 1
        delivery.last_status_code = status_code
        delivery.last_error = error
        delivery.status = status
        if status == DELIVERED:
            delivery.delivered_at = at
        if retry_at is not None:
            delivery.next_attempt_at = retry_at
        self.session.flush()

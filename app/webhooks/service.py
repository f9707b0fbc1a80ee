"""Webhook deliveries (being built): scheduled with each status change of a job."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from app.jobs.models import Job, JobEvent


def check_webhook_url(url: str | None, *, allow_private: bool) -> None:
    """Refuse a webhook URL that would reach the service's own network (not built yet)."""


def schedule_deliveries(session: Session, job: Job, event: JobEvent) -> None:
    """Queue a delivery of ``event`` to the job's ``webhook_url`` (not built yet)."""

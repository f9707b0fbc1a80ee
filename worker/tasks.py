"""Thin Celery tasks: each takes an id, and the module it calls opens its own session."""

from __future__ import annotations

from app.broker import DELIVER_WEBHOOKS, INSPECT_UPLOAD, RECONCILE, RUN_JOB
from app.config import get_settings
from worker.celery_app import app
from worker.lifecycle import listen_for_handback


@app.task(name=RUN_JOB, ignore_result=True)
def run_job(job_id: str) -> None:
    """Run job ``job_id`` if it is still queued; safe to deliver twice."""
    # Imported here: the runner loads in the child that runs the job only.
    from worker.runner import execute_job

    listen_for_handback()
    execute_job(job_id)


@app.task(name=INSPECT_UPLOAD, ignore_result=True)
def inspect_upload(kind: str, row_id: str) -> None:
    """Inspect an upload the API kept as ``processing``; safe to deliver twice."""
    from worker.upload_inspection import inspect_input

    inspect_input(kind, row_id)


@app.task(name=RECONCILE, ignore_result=True)
def reconcile() -> None:
    """Requeue or fail jobs whose worker was lost; resend lost messages (periodic)."""
    from worker.reconciler import reconcile as run_reconciler

    run_reconciler()


@app.task(name=DELIVER_WEBHOOKS, ignore_result=True)
def deliver_webhooks() -> None:
    """POST the due webhook deliveries (periodic)."""
    from worker.sessions import worker_sessions
    from worker.webhook_delivery import deliver_due

    settings = get_settings()
    deliver_due(worker_sessions(settings), settings)

"""Celery's configuration, shared by the worker and by the API that sends it jobs.

Messages carry only ids and are JSON; a job is acknowledged after it ran
(``acks_late``), one at a time per process (prefetch 1). Tasks run in a forked
child that imports torch, so CUDA is never initialised in the parent, and each
child runs one job and exits, so a job's memory (and GPU memory) goes with it.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from app.config import Settings

#: The queue jobs and upload inspections go to; GPU workers consume it, one task at a time.
JOBS_QUEUE = "distillery.jobs"
#: The queue of short periodic tasks, consumed by the control worker (never behind a job).
CONTROL_QUEUE = "distillery.control"
RUN_JOB = "distillery.run_job"
INSPECT_UPLOAD = "distillery.inspect_upload"
RECONCILE = "distillery.reconcile"
DELIVER_WEBHOOKS = "distillery.deliver_webhooks"


def broker_options(settings: Settings) -> dict[str, Any]:
    """Transport options for the configured broker."""
    folder = settings.broker_folder()
    if folder is not None:
        # Producer and consumers share one folder of message files.
        queue, processed, control = folder / "queue", folder / "processed", folder / "control"
        for path in (queue, processed, control):
            path.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            "processed_folder": str(processed),
            "control_folder": str(control),
            "store_processed": False,
        }
    return {"visibility_timeout": settings.visibility_timeout_s}


def create_celery(settings: Settings) -> Celery:
    """A Celery application on ``settings``' broker."""
    celery = Celery("distillery", include=["worker.tasks"])
    celery.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # The database holds every job's state; Celery keeps no results.
        task_ignore_result=True,
        task_default_queue=JOBS_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="prefork",
        worker_max_tasks_per_child=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
        task_routes={
            RECONCILE: {"queue": CONTROL_QUEUE},
            DELIVER_WEBHOOKS: {"queue": CONTROL_QUEUE},
        },
        # Each run expires once the next is due: a backlog of periodic runs is never kept.
        beat_schedule={
            "reconcile": {
                "task": RECONCILE,
                "schedule": settings.reconcile_interval_s,
                "options": {"expires": settings.reconcile_interval_s},
            },
            "deliver-webhooks": {
                "task": DELIVER_WEBHOOKS,
                "schedule": settings.webhook_poll_s,
                "options": {"expires": settings.webhook_poll_s},
            },
        },
    )
    return celery

"""The contract between the API and the workers: task names, queues, and how messages travel.

Messages carry only ids and are JSON. The API (and a worker sending follow-up
work) sends with :func:`create_producer`; :mod:`worker.celery_app` builds the
consuming application on the same :func:`celery_config`, so both sides always
agree on the broker, the serializer and the routes.
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


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings producers and workers share: broker, serialization, routes."""
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": broker_options(settings),
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        # The database holds every job's state; Celery keeps no results.
        "task_ignore_result": True,
        "task_default_queue": JOBS_QUEUE,
        "enable_utc": True,
        "task_routes": {
            RECONCILE: {"queue": CONTROL_QUEUE},
            DELIVER_WEBHOOKS: {"queue": CONTROL_QUEUE},
        },
    }


def create_producer(settings: Settings) -> Celery:
    """A Celery application that sends tasks by name on ``settings``' broker (it runs none)."""
    celery = Celery("distillery")
    celery.conf.update(celery_config(settings))
    return celery

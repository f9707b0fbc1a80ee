"""The Celery application: ``celery -A worker.celery_app worker`` (and ``beat``).

Settings come from the same ``DISTILL_*`` environment as the API; the broker,
task names and routes are the API's (:mod:`app.broker`). A job is acknowledged
after it ran (``acks_late``), one at a time per process (prefetch 1). Tasks run
in a forked child that imports torch, so CUDA is never initialised in the
parent, and each child runs one job and exits, so a job's memory (and GPU
memory) goes with it.
"""

from __future__ import annotations

from celery import Celery

import worker.lifecycle  # noqa: F401 - connects the graceful-shutdown signals
from app.broker import DELIVER_WEBHOOKS, RECONCILE, celery_config
from app.config import Settings, get_settings


def create_worker_app(settings: Settings) -> Celery:
    """The workers' Celery application on ``settings``: the tasks, how they run, the schedule."""
    celery = Celery("distillery", include=["worker.tasks"])
    celery.conf.update(
        celery_config(settings),
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="prefork",
        worker_max_tasks_per_child=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
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


app = create_worker_app(get_settings())

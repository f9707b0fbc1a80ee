"""The Celery application as workers load it: its configuration, and what its parent imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.broker import CONTROL_QUEUE, DELIVER_WEBHOOKS, JOBS_QUEUE, RECONCILE
from app.config import Settings
from tests.app.databases import REPO
from worker.celery_app import create_worker_app


def test_the_worker_parent_never_imports_torch() -> None:
    # CUDA must never be initialised in the parent: only forked children run jobs.
    code = (
        "import sys, worker.celery_app, worker.tasks, worker.lifecycle; "
        "worker.celery_app.app.loader.import_default_modules(); "
        "print('torch' in sys.modules, sorted(worker.celery_app.app.tasks)[:1])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("False"), out.stdout


def test_jobs_are_json_acknowledged_late_and_taken_one_at_a_time(tmp_path: Path) -> None:
    conf = create_worker_app(Settings(broker_url=f"filesystem://{tmp_path}")).conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    assert conf.task_default_queue == JOBS_QUEUE
    assert {conf.task_routes[t]["queue"] for t in (RECONCILE, DELIVER_WEBHOOKS)} == {CONTROL_QUEUE}


def test_redis_keeps_a_job_invisible_for_longer_than_the_longest_job() -> None:
    conf = create_worker_app(Settings(broker_url="redis://127.0.0.1:6379/11")).conf
    hours = conf.broker_transport_options["visibility_timeout"] / 3600
    assert hours >= 24

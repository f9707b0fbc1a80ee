"""Upload inspection in a worker: the files too large for the API to inspect.

The API keeps such an upload as ``processing`` and sends its id; the task
reads the stored file with the engine's inspector and settles the jobs that
waited for it.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from app import stored_files
from app.config import Settings, get_settings
from app.datasets import service as datasets
from app.datasets.models import Dataset
from app.jobs import service
from app.jobs.queue import JobQueue
from app.models import service as models
from app.models.models import TeacherModel
from app.storage import LocalStorage
from worker.sessions import worker_sessions

log = logging.getLogger(__name__)

#: What each kind of upload is stored as and how it is read.
KINDS: dict[str, tuple[type[TeacherModel] | type[Dataset], stored_files.Inspector[Any]]] = {
    "models": (TeacherModel, models.INSPECTOR),
    "datasets": (Dataset, datasets.INSPECTOR),
}


def inspect_input(kind: str, row_id: str, settings: Settings | None = None) -> None:
    """Inspect the ``processing`` upload ``row_id`` of ``kind``; safe to run twice.

    The row becomes ``ready`` or ``invalid``; jobs that waited for it are then
    sent to the workers or failed with its error, in the same transaction.
    """
    settings = settings or get_settings()
    if kind not in KINDS:
        log.error("inspection of unknown kind %r dropped", kind)
        return
    row_type, inspector = KINDS[kind]
    queue = JobQueue(settings)
    try:
        with worker_sessions(settings)() as session, session.begin():
            row = session.get(row_type, uuid.UUID(row_id), with_for_update=True)
            assert row is None or isinstance(row, TeacherModel | Dataset)
            if row is None or row.status != "processing":
                log.info("%s %s is not waiting for inspection", kind, row_id)
                return
            stored_files.complete_inspection(LocalStorage(settings.storage_root()), row, inspector)
            service.release_waiting_jobs(session, queue.send, row)
    finally:
        queue.close()

"""Transfer datasets: store an upload once the engine has inspected it; read, list, delete.

Inspection reads the whole file with the engine's torch-free
:func:`inspect_dataset` (never unpickling anything) before the file is kept:
a refused or malformed dataset leaves no row and no file. Files too large to
inspect in the API are kept as ``processing`` and inspected by a worker.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.orm import Session

from app import stored_files
from app.auth.models import Tenant
from app.datasets.models import Dataset
from app.datasets.repository import DatasetRepository
from app.jobs.service import refuse_if_in_use
from app.pagination import Cursor
from app.storage import LocalStorage
from app.uploads import Upload
from worker.engine.data import inspect_dataset, sniff_dataset
from worker.engine.errors import DatasetInvalid


def _columns(summary: dict[str, Any]) -> dict[str, Any]:
    return {"format": summary["format"], "rows": summary["rows"], "summary": summary}


INSPECTOR: stored_files.Inspector[dict[str, Any]] = stored_files.Inspector(
    kind="datasets",
    screen=sniff_dataset,
    inspect=inspect_dataset,
    columns=_columns,
    invalid=DatasetInvalid("the file could not be read as a dataset"),
)


def create_dataset(
    session: Session,
    storage: LocalStorage,
    *,
    tenant: Tenant,
    dataset_id: uuid.UUID,
    upload: Upload,
    inline_max_bytes: int,
    send_inspection: Callable[[str, uuid.UUID], None],
) -> Dataset:
    """Keep the uploaded dataset, inspected (``ready``) or to be inspected by a worker
    (``processing``, above ``inline_max_bytes``); blocking, run it off the event loop.

    Raises :class:`UnsupportedMediaType` for pickled and unrecognised files and
    :class:`Unprocessable` (the engine's code, naming ``file``) for malformed and
    unsafe ones; the upload is discarded.
    """
    return stored_files.store_upload(
        session,
        storage,
        DatasetRepository(session),
        INSPECTOR,
        upload,
        tenant=tenant,
        row_id=dataset_id,
        inline_max_bytes=inline_max_bytes,
        send_inspection=send_inspection,
    )


def get_dataset(session: Session, *, tenant: Tenant, dataset_id: str) -> Dataset:
    """The tenant's dataset ``dataset_id``; :class:`NotFound` for unknown and malformed ids."""
    return DatasetRepository(session).get_owned(tenant.id, dataset_id)


def list_datasets(
    session: Session, *, tenant: Tenant, limit: int, after: Cursor | None
) -> tuple[Sequence[Dataset], Cursor | None]:
    """A page of the tenant's datasets, newest first, and the cursor of the next page."""
    return DatasetRepository(session).list_page(tenant.id, limit=limit, after=after)


def delete_dataset(
    session: Session, storage: LocalStorage, *, tenant: Tenant, dataset_id: str
) -> None:
    """Delete the tenant's dataset ``dataset_id`` and its file; :class:`Conflict` while
    a queued or running job uses it."""
    dataset = get_dataset(session, tenant=tenant, dataset_id=dataset_id)
    refuse_if_in_use(session, dataset)
    stored_files.delete_owned(session, storage, DatasetRepository(session), dataset)

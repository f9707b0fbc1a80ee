"""Transfer datasets: store an upload once the engine has inspected it; read, list, delete.

Inspection reads the whole file with the engine's torch-free
:func:`inspect_dataset` (never unpickling anything) before the file is kept:
a refused or malformed dataset leaves no row and no file.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy.orm import Session

from app import stored_files
from app.auth.models import Tenant
from app.datasets.models import Dataset
from app.datasets.repository import DatasetRepository
from app.jobs.models import Job
from app.jobs.service import refuse_if_in_use
from app.pagination import Cursor
from app.storage import LocalStorage
from app.uploads import Upload
from worker.engine.data import inspect_dataset
from worker.engine.errors import DatasetInvalid


def create_dataset(
    session: Session,
    storage: LocalStorage,
    *,
    tenant: Tenant,
    dataset_id: uuid.UUID,
    upload: Upload,
) -> Dataset:
    """Inspect the uploaded dataset and keep it as ``ready``; blocking, run it off the event loop.

    Raises :class:`Unprocessable` (the engine's code, naming ``file``) for
    malformed, unsafe, pickled and unrecognised files; the upload is discarded.
    """
    with upload.file:
        summary = stored_files.inspect_upload(
            upload,
            inspect_dataset,
            invalid=DatasetInvalid("the file could not be read as a dataset"),
        )
        dataset = Dataset(
            **stored_files.ready_columns(
                upload, tenant=tenant, row_id=dataset_id, fmt=summary["format"]
            ),
            rows=summary["rows"],
            summary=summary,
        )
        return stored_files.keep_upload(
            session, storage, DatasetRepository(session), dataset, upload
        )


def get_dataset(session: Session, *, tenant: Tenant, dataset_id: str) -> Dataset:
    """The tenant's dataset ``dataset_id``; :class:`NotFound` for unknown and malformed ids."""
    return stored_files.get_owned(DatasetRepository(session), tenant, dataset_id, what="dataset")


def list_datasets(
    session: Session, *, tenant: Tenant, limit: int, after: Cursor | None
) -> tuple[Sequence[Dataset], Cursor | None]:
    """A page of the tenant's datasets, newest first, and the cursor of the next page."""
    return stored_files.list_page(DatasetRepository(session), tenant, limit=limit, after=after)


def delete_dataset(
    session: Session, storage: LocalStorage, *, tenant: Tenant, dataset_id: str
) -> None:
    """Delete the tenant's dataset ``dataset_id`` and its file; :class:`Conflict` while
    a queued or running job uses it."""
    dataset = get_dataset(session, tenant=tenant, dataset_id=dataset_id)
    refuse_if_in_use(session, Job.dataset_id, dataset.id, what="dataset")
    stored_files.delete_owned(session, storage, DatasetRepository(session), dataset)

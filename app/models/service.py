"""Teacher models: store an upload once the engine has inspected it; read, list, delete.

Inspection reads the file with the engine's torch-free :func:`inspect` (never
unpickling anything) before the file is kept: a refused or malformed teacher
leaves no row and no file.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy.orm import Session

from app import stored_files
from app.auth.models import Tenant
from app.jobs.models import Job
from app.jobs.service import refuse_if_in_use
from app.models.models import TeacherModel
from app.models.repository import ModelRepository
from app.pagination import Cursor
from app.storage import LocalStorage
from app.uploads import Upload
from worker.engine.errors import TeacherInvalid
from worker.engine.inspection import inspect


def create_model(
    session: Session,
    storage: LocalStorage,
    *,
    tenant: Tenant,
    model_id: uuid.UUID,
    upload: Upload,
) -> TeacherModel:
    """Inspect the uploaded teacher and keep it as ``ready``; blocking, run it off the event loop.

    Raises :class:`UnsupportedMediaType` for refused formats (pickle-based and
    unknown files, with the engine's explanation) and :class:`Unprocessable` for
    malformed teachers; either way the upload is discarded.
    """
    with upload.file:
        signature = stored_files.inspect_upload(
            upload,
            inspect,
            invalid=TeacherInvalid("the file could not be read as a teacher model"),
        )
        model = TeacherModel(
            **stored_files.ready_columns(
                upload, tenant=tenant, row_id=model_id, fmt=signature.format
            ),
            signature=signature.to_dict(),
        )
        return stored_files.keep_upload(session, storage, ModelRepository(session), model, upload)


def get_model(session: Session, *, tenant: Tenant, model_id: str) -> TeacherModel:
    """The tenant's model ``model_id``; :class:`NotFound` for unknown and malformed ids."""
    return stored_files.get_owned(ModelRepository(session), tenant, model_id, what="model")


def list_models(
    session: Session, *, tenant: Tenant, limit: int, after: Cursor | None
) -> tuple[Sequence[TeacherModel], Cursor | None]:
    """A page of the tenant's models, newest first, and the cursor of the next page."""
    return stored_files.list_page(ModelRepository(session), tenant, limit=limit, after=after)


def delete_model(session: Session, storage: LocalStorage, *, tenant: Tenant, model_id: str) -> None:
    """Delete the tenant's model ``model_id`` and its file; :class:`Conflict` while
    a queued or running job uses it."""
    model = get_model(session, tenant=tenant, model_id=model_id)
    refuse_if_in_use(session, Job.teacher_model_id, model.id, what="model")
    stored_files.delete_owned(session, storage, ModelRepository(session), model)

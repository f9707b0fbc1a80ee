"""Teacher models: store an upload once the engine has inspected it; read, list, delete.

Inspection reads the file with the engine's torch-free inspection (never
unpickling anything; a large file in a child process under a memory and time
budget) before the file is kept: a refused or malformed teacher leaves no row
and no file. Files too large to inspect in the API are kept as
``processing`` and inspected by a worker.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.orm import Session

from app import stored_files
from app.auth.models import Tenant
from app.jobs.service import refuse_if_in_use
from app.models.models import TeacherModel
from app.models.repository import ModelRepository
from app.pagination import Cursor
from app.storage import LocalStorage
from app.uploads import Upload
from worker.engine.errors import TeacherInvalid
from worker.engine.inspection import screen_teacher
from worker.engine.isolated import inspect_isolated
from worker.engine.signature import TeacherSignature


def _columns(signature: TeacherSignature) -> dict[str, Any]:
    return {"format": signature.format, "signature": signature.to_dict()}


INSPECTOR: stored_files.Inspector[TeacherSignature] = stored_files.Inspector(
    kind="models",
    screen=screen_teacher,
    # A large teacher is parsed in a child process under a memory and time budget.
    inspect=inspect_isolated,
    columns=_columns,
    invalid=TeacherInvalid("the file could not be read as a teacher model"),
)


def create_model(
    session: Session,
    storage: LocalStorage,
    *,
    tenant: Tenant,
    model_id: uuid.UUID,
    upload: Upload,
    inline_max_bytes: int,
    send_inspection: Callable[[str, uuid.UUID], None],
) -> TeacherModel:
    """Keep the uploaded teacher, inspected (``ready``) or to be inspected by a worker
    (``processing``, above ``inline_max_bytes``); blocking, run it off the event loop.

    Raises :class:`UnsupportedMediaType` for refused formats (pickle-based and
    unknown files, with the engine's explanation) and :class:`Unprocessable` for
    malformed teachers; either way the upload is discarded.
    """
    return stored_files.store_upload(
        session,
        storage,
        ModelRepository(session),
        INSPECTOR,
        upload,
        tenant=tenant,
        row_id=model_id,
        inline_max_bytes=inline_max_bytes,
        send_inspection=send_inspection,
    )


def get_model(session: Session, *, tenant: Tenant, model_id: str) -> TeacherModel:
    """The tenant's model ``model_id``; :class:`NotFound` for unknown and malformed ids."""
    return ModelRepository(session).get_owned(tenant.id, model_id)


def list_models(
    session: Session, *, tenant: Tenant, limit: int, after: Cursor | None
) -> tuple[Sequence[TeacherModel], Cursor | None]:
    """A page of the tenant's models, newest first, and the cursor of the next page."""
    return ModelRepository(session).list_page(tenant.id, limit=limit, after=after)


def delete_model(session: Session, storage: LocalStorage, *, tenant: Tenant, model_id: str) -> None:
    """Delete the tenant's model ``model_id`` and its file; :class:`Conflict` while
    a queued or running job uses it."""
    model = get_model(session, tenant=tenant, model_id=model_id)
    refuse_if_in_use(session, model)
    stored_files.delete_owned(session, storage, ModelRepository(session), model)

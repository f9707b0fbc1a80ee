"""Teacher models: store an upload once the engine has inspected it; read, list, delete.

Inspection reads the file with the engine's torch-free :func:`inspect` (never
unpickling anything) before the file is kept: a refused or malformed teacher
leaves no row and no file.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from sqlalchemy.orm import Session

from app.auth.models import Tenant
from app.db import after_commit, after_rollback
from app.errors import FieldError, NotFound, Unprocessable, UnsupportedMediaType
from app.models.models import TeacherModel
from app.models.repository import ModelRepository
from app.pagination import Cursor
from app.storage import LocalStorage
from app.uploads import Upload
from worker.engine.errors import EngineError, UnsupportedFormat
from worker.engine.inspection import inspect

log = logging.getLogger(__name__)

FILE_FIELD = "file"


def storage_key(tenant_id: uuid.UUID, model_id: uuid.UUID) -> str:
    """Where a model's file is stored."""
    return f"tenants/{tenant_id.hex}/models/{model_id.hex}"


def _rejected(error: EngineError) -> UnsupportedMediaType | Unprocessable:
    """An engine error about the uploaded file as the HTTP error a client should see."""
    if isinstance(error, UnsupportedFormat):
        return UnsupportedMediaType(error.message, code=error.code)
    return Unprocessable(
        error.message,
        code=error.code,
        errors=[FieldError(field=FILE_FIELD, reason=error.message)],
    )


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
        try:
            signature = inspect(upload.file.temp_path)
        except EngineError as exc:
            raise _rejected(exc) from None
        except Exception:
            # A parser failing on hostile bytes is still bad input, not a server error.
            log.exception("inspecting an uploaded teacher failed")
            raise Unprocessable(
                "the file could not be read as a teacher model",
                code="teacher_invalid",
                errors=[FieldError(field=FILE_FIELD, reason="unreadable")],
            ) from None
        filename = upload.filename or f"{model_id.hex}.{signature.format}"
        model = TeacherModel(
            id=model_id,
            tenant_id=tenant.id,
            name=upload.fields.get("name") or filename,
            status="ready",
            format=signature.format,
            filename=filename,
            bytes=upload.file.size,
            sha256=upload.file.sha256,
            storage_key=upload.file.key,
            signature=signature.to_dict(),
            error=None,
        )
        ModelRepository(session).add(model)
        # Kept only once the row is flushed, and removed again if the transaction
        # rolls back: a failed upload leaves no row and no file.
        stored = upload.file.commit()
        after_rollback(session, lambda: storage.delete(stored.key))
    return model


def get_model(session: Session, *, tenant: Tenant, model_id: str) -> TeacherModel:
    """The tenant's model ``model_id``; :class:`NotFound` for unknown and malformed ids."""
    try:
        ident = uuid.UUID(model_id)
    except ValueError:
        ident = None
    model = ModelRepository(session).get(tenant.id, ident) if ident else None
    if model is None:
        raise NotFound(f"no model {model_id!r}", code="model_not_found")
    return model


def list_models(
    session: Session, *, tenant: Tenant, limit: int, after: Cursor | None
) -> tuple[Sequence[TeacherModel], Cursor | None]:
    """A page of the tenant's models, newest first, and the cursor of the next page."""
    rows = ModelRepository(session).page(tenant.id, limit=limit + 1, after=after)
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, Cursor(rows[-1].created_at, rows[-1].id)


def delete_model(session: Session, storage: LocalStorage, *, tenant: Tenant, model_id: str) -> None:
    """Delete the tenant's model ``model_id`` and its file."""
    model = get_model(session, tenant=tenant, model_id=model_id)
    ModelRepository(session).delete(model)
    key = model.storage_key
    # Only once the row is gone for good: a rolled-back delete keeps its file.
    after_commit(session, lambda: storage.delete(key))

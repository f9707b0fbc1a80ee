"""Rows that own an uploaded file (teacher models, datasets), and the flow they share.

An upload is inspected by the engine before its file is kept: a refused or
malformed file leaves no row and no file. The file is kept once the row is
flushed and removed again if the transaction rolls back; a deleted row's file
goes only once the delete commits.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from fastapi import Request, Response
from sqlalchemy.orm import Session

from app.auth.models import Tenant
from app.config import Settings
from app.db import after_commit, after_rollback
from app.display_names import MAX_NAME_CHARS, display_name, file_display_name
from app.downloads import content_response
from app.errors import FieldError, Unprocessable, UnsupportedMediaType, public_message
from app.repository import StoredFileRepository
from app.storage import LocalStorage
from app.tenancy import StoredFile
from app.uploads import Upload, receive_upload
from worker.engine.errors import EngineError, UnsupportedFormat

log = logging.getLogger(__name__)

#: The multipart field that carries the file, and the field errors name.
FILE_FIELD = "file"

T = TypeVar("T")
RowT = TypeVar("RowT", bound=StoredFile)


def storage_key(kind: str, tenant_id: uuid.UUID, row_id: uuid.UUID) -> str:
    """Where a tenant's file of ``kind`` (``models``, ``datasets``) is stored."""
    return f"tenants/{tenant_id.hex}/{kind}/{row_id.hex}"


async def receive(
    request: Request, storage: LocalStorage, settings: Settings, *, kind: str, tenant: Tenant
) -> tuple[uuid.UUID, Upload]:
    """A new row id and the request's upload (``file``, optional ``name``), streamed to its key.

    The body is parsed as it arrives (constant memory) and capped at
    ``settings.max_upload_bytes``. Control characters are dropped from ``name``
    and the file name; a ``name`` longer than :data:`MAX_NAME_CHARS` is a 422.
    """
    row_id = uuid.uuid4()
    upload = await receive_upload(
        request,
        storage,
        storage_key(kind, tenant.id, row_id),
        max_bytes=settings.max_upload_bytes,
        file_field=FILE_FIELD,
        text_fields=frozenset({"name"}),
        idle_timeout_s=settings.body_idle_timeout_s,
    )
    name = display_name(upload.fields.get("name", ""))
    if len(name) > MAX_NAME_CHARS:
        upload.file.abort()
        reason = f"longer than {MAX_NAME_CHARS} characters"
        raise Unprocessable(
            f"name is {reason}",
            code="validation_error",
            errors=[FieldError(field="name", reason=reason)],
        )
    upload.fields["name"] = name
    upload.filename = file_display_name(upload.filename or "") or None
    return row_id, upload


def rejected(error: EngineError) -> UnsupportedMediaType | Unprocessable:
    """An engine error about the uploaded file as the HTTP error a client should see."""
    message = public_message(error.message)
    errors = [FieldError(field=FILE_FIELD, reason=message)]
    if isinstance(error, UnsupportedFormat):
        return UnsupportedMediaType(message, code=error.code, errors=errors)
    return Unprocessable(message, code=error.code, errors=errors)


def inspect_upload(upload: Upload, inspect: Callable[[Path], T], *, invalid: EngineError) -> T:
    """``inspect`` of the upload's written file; engine errors as HTTP errors.

    ``invalid`` is reported when the parser fails in a way the engine did not
    foresee: hostile bytes are still bad input, not a server error.
    """
    try:
        return inspect(upload.file.temp_path)
    except EngineError as exc:
        raise rejected(exc) from None
    except Exception:
        log.exception("inspecting an upload failed")
        raise rejected(invalid) from None


def ready_columns(upload: Upload, *, tenant: Tenant, row_id: uuid.UUID, fmt: str) -> dict[str, Any]:
    """The shared columns of a ``ready`` row for an inspected upload of format ``fmt``."""
    filename = upload.filename or f"{row_id.hex}.{fmt}"
    return {
        "id": row_id,
        "tenant_id": tenant.id,
        "name": upload.fields.get("name") or filename,
        "status": "ready",
        "format": fmt,
        "filename": filename,
        "bytes": upload.file.size,
        "sha256": upload.file.sha256,
        "storage_key": upload.file.key,
        "error": None,
    }


@dataclass(frozen=True)
class Inspector(Generic[T]):
    """How the engine reads one kind of upload.

    ``screen`` names the format from the first bytes (cheap, refuses pickles);
    ``inspect`` reads the file whole; ``columns`` turns what it read into the
    row's columns (``format`` among them).
    """

    kind: str
    screen: Callable[[Path], str]
    inspect: Callable[[Path], T]
    columns: Callable[[T], dict[str, Any]]
    invalid: EngineError


def store_upload(
    session: Session,
    storage: LocalStorage,
    repository: StoredFileRepository[RowT],
    inspector: Inspector[Any],
    upload: Upload,
    *,
    tenant: Tenant,
    row_id: uuid.UUID,
    inline_max_bytes: int,
    send_inspection: Callable[[str, uuid.UUID], None],
) -> RowT:
    """Keep an upload as a ``ready`` row, or as ``processing`` when it is too large to inspect here.

    Up to ``inline_max_bytes`` the file is inspected now (blocking: run it off
    the event loop) and a bad file leaves nothing behind. A larger file is only
    screened (pickles are still refused at once); the worker inspects it after
    the commit (``send_inspection``) and sets ``ready`` or ``invalid``.
    """
    with upload.file:
        if upload.file.size <= inline_max_bytes:
            found = inspect_upload(upload, inspector.inspect, invalid=inspector.invalid)
            columns = inspector.columns(found)
            fmt = columns.pop("format")
            row: Any = repository.row_type(
                **ready_columns(upload, tenant=tenant, row_id=row_id, fmt=fmt), **columns
            )
        else:
            fmt = inspect_upload(upload, inspector.screen, invalid=inspector.invalid)
            columns = ready_columns(upload, tenant=tenant, row_id=row_id, fmt=fmt)
            row = repository.row_type(**{**columns, "status": "processing"})
            after_commit(session, lambda: send_inspection(inspector.kind, row_id))
        kept: RowT = keep_upload(session, storage, repository, row, upload)
        return kept


def complete_inspection(storage: LocalStorage, row: StoredFile, inspector: Inspector[Any]) -> None:
    """Inspect a ``processing`` row's stored file and set it ``ready`` or ``invalid``."""
    error: EngineError | None = None
    try:
        columns = inspector.columns(inspector.inspect(storage.path(row.storage_key)))
    except EngineError as exc:
        error = exc
    except Exception:
        # Hostile bytes are bad input, not a server error.
        log.exception("inspecting stored %s %s failed", inspector.kind, row.id)
        error = inspector.invalid
    if error is not None:
        row.status = "invalid"
        row.error = {"code": error.code, "message": public_message(error.message)}
        return
    for name, value in columns.items():
        setattr(row, name, value)
    row.status = "ready"
    row.error = None


def keep_upload(
    session: Session,
    storage: LocalStorage,
    repository: StoredFileRepository[RowT],
    row: RowT,
    upload: Upload,
) -> RowT:
    """Add ``row`` and keep the upload's file; the file goes again if the transaction rolls back."""
    repository.add(row)
    stored = upload.file.commit()
    after_rollback(session, lambda: storage.delete(stored.key))
    return row


def delete_owned(
    session: Session, storage: LocalStorage, repository: StoredFileRepository[RowT], row: RowT
) -> None:
    """Delete ``row``; its file goes once the delete commits (a rollback keeps it)."""
    repository.delete(row)
    key = row.storage_key
    after_commit(session, lambda: storage.delete(key))


def content(request: Request, storage: LocalStorage, row: StoredFile) -> Response:
    """``row``'s file, with ETag (its sha256), Range and Content-Disposition."""
    return content_response(
        request, storage, row.storage_key, sha256=row.sha256, size=row.bytes, filename=row.filename
    )

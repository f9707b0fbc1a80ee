"""``/v1/models``: teacher uploads, listing, reading, deletion and download."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, Request, Response, status

from app import stored_files
from app.auth.dependencies import CurrentTenant
from app.config import SettingsDep
from app.db import SessionDep
from app.downloads import CONTENT_RESPONSES
from app.errors import (
    Conflict,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
    responses,
)
from app.jobs.queue import JobQueueDep
from app.models import service
from app.models.schemas import ModelOut
from app.pagination import Page, PageParams, page_params
from app.storage import StorageDep
from app.uploads import UPLOAD_BODY

router = APIRouter(prefix="/v1/models", tags=["models"], responses=responses(Unauthorized))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Upload a teacher model",
    responses=responses(PayloadTooLarge, UnsupportedMediaType, Unprocessable),
    openapi_extra=UPLOAD_BODY,
)
async def upload_model(
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    queue: JobQueueDep,
) -> ModelOut:
    """Stream the multipart ``file`` to storage, inspect it, and return the model.

    The body is parsed as it arrives (constant memory); the format is sniffed
    from the content. Pickle-based files are refused with 415.
    """
    model_id, upload = await stored_files.receive(
        request, storage, settings, kind="models", tenant=tenant
    )
    # Inspection parses the file and the session blocks: both off the event loop.
    model = await anyio.to_thread.run_sync(
        partial(
            service.create_model,
            session,
            storage,
            tenant=tenant,
            model_id=model_id,
            upload=upload,
            inline_max_bytes=settings.inline_inspection_max_bytes,
            send_inspection=queue.inspect,
        )
    )
    return ModelOut.model_validate(model)


@router.get("", summary="List teacher models, newest first")
def list_models(
    tenant: CurrentTenant,
    session: SessionDep,
    page: Annotated[PageParams, Depends(page_params)],
) -> Page[ModelOut]:
    """A page of the tenant's models; pass ``next_cursor`` as ``after`` for the next."""
    rows, cursor = service.list_models(session, tenant=tenant, limit=page.limit, after=page.after)
    return Page[ModelOut](
        data=[ModelOut.model_validate(r) for r in rows],
        next_cursor=None if cursor is None else cursor.encode(),
    )


@router.get("/{model_id}", summary="Read a teacher model", responses=responses(NotFound))
def get_model(model_id: str, tenant: CurrentTenant, session: SessionDep) -> ModelOut:
    """The model, with its signature."""
    return ModelOut.model_validate(service.get_model(session, tenant=tenant, model_id=model_id))


@router.delete(
    "/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a teacher model",
    responses=responses(NotFound, Conflict),
)
def delete_model(
    model_id: str, tenant: CurrentTenant, session: SessionDep, storage: StorageDep
) -> Response:
    """Delete the model and its stored file."""
    service.delete_model(session, storage, tenant=tenant, model_id=model_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{model_id}/content",
    summary="Download a teacher model's file",
    response_class=Response,
    responses=CONTENT_RESPONSES,
)
def download_model(
    model_id: str,
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    storage: StorageDep,
) -> Response:
    """The stored file, with ETag (its sha256), Range and Content-Disposition."""
    model = service.get_model(session, tenant=tenant, model_id=model_id)
    return stored_files.content(request, storage, model)

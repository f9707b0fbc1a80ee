"""``/v1/datasets``: transfer-set uploads, listing, reading, deletion and download."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, Request, Response, status

from app import stored_files
from app.auth.dependencies import CurrentTenant
from app.config import SettingsDep
from app.datasets import service
from app.datasets.schemas import DatasetOut
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
from app.pagination import Page, PageParams, page_params
from app.storage import StorageDep
from app.uploads import UPLOAD_BODY

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=responses(Unauthorized))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Upload a dataset",
    responses=responses(PayloadTooLarge, UnsupportedMediaType, Unprocessable),
    openapi_extra=UPLOAD_BODY,
)
async def upload_dataset(
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    queue: JobQueueDep,
) -> DatasetOut:
    """Stream the multipart ``file`` to storage, inspect it, and return the dataset.

    The body is parsed as it arrives (constant memory); the format is sniffed
    from the content. Pickled and unrecognised files get 415, malformed and
    unsafe ones 422, each with the engine's code.
    """
    dataset_id, upload = await stored_files.receive(
        request, storage, settings, kind="datasets", tenant=tenant
    )
    # Inspection parses the file and the session blocks: both off the event loop.
    dataset = await anyio.to_thread.run_sync(
        partial(
            service.create_dataset,
            session,
            storage,
            tenant=tenant,
            dataset_id=dataset_id,
            upload=upload,
            inline_max_bytes=settings.inline_inspection_max_bytes,
            send_inspection=queue.inspect,
        )
    )
    return DatasetOut.model_validate(dataset)


@router.get("", summary="List datasets, newest first")
def list_datasets(
    tenant: CurrentTenant,
    session: SessionDep,
    page: Annotated[PageParams, Depends(page_params)],
) -> Page[DatasetOut]:
    """A page of the tenant's datasets; pass ``next_cursor`` as ``after`` for the next."""
    rows, cursor = service.list_datasets(session, tenant=tenant, limit=page.limit, after=page.after)
    return Page[DatasetOut](
        data=[DatasetOut.model_validate(r) for r in rows],
        next_cursor=None if cursor is None else cursor.encode(),
    )


@router.get("/{dataset_id}", summary="Read a dataset", responses=responses(NotFound))
def get_dataset(dataset_id: str, tenant: CurrentTenant, session: SessionDep) -> DatasetOut:
    """The dataset, with its summary."""
    return DatasetOut.model_validate(
        service.get_dataset(session, tenant=tenant, dataset_id=dataset_id)
    )


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a dataset",
    responses=responses(NotFound, Conflict),
)
def delete_dataset(
    dataset_id: str, tenant: CurrentTenant, session: SessionDep, storage: StorageDep
) -> Response:
    """Delete the dataset and its stored file."""
    service.delete_dataset(session, storage, tenant=tenant, dataset_id=dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{dataset_id}/content",
    summary="Download a dataset's file",
    response_class=Response,
    responses=CONTENT_RESPONSES,
)
def download_dataset(
    dataset_id: str,
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    storage: StorageDep,
) -> Response:
    """The stored file, with ETag (its sha256), Range and Content-Disposition."""
    dataset = service.get_dataset(session, tenant=tenant, dataset_id=dataset_id)
    return stored_files.content(request, storage, dataset)

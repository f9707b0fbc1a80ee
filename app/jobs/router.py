"""``/v1/jobs``: submit, list, read and cancel jobs; follow their events; download artifacts."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from app.auth.dependencies import CurrentPrincipal, CurrentTenant
from app.config import SettingsDep
from app.db import DatabaseBusy, SessionDep, run_database_call
from app.downloads import CONTENT_RESPONSES, content_response
from app.errors import (
    Conflict,
    FieldError,
    NotFound,
    TooManyRequests,
    Unauthorized,
    Unprocessable,
    responses,
)
from app.jobs import service
from app.jobs.events import EVENT_STREAM, event_stream, wants_event_stream
from app.jobs.models import MAX_EVENT_ID
from app.jobs.polling import MAX_WAIT_S, job_read_headers, poll_job
from app.jobs.queue import JobQueueDep
from app.jobs.schemas import ArtifactList, ArtifactOut, JobEventPage, JobOut, JobStatus
from app.pagination import Page, PageParams, page_params
from app.storage import StorageDep
from worker.engine.spec import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=responses(Unauthorized))

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Retry-safe submission: the same key and spec return the same job; "
        "the same key with another spec is a 409.",
    ),
]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Submit a distillation job",
    responses=responses(Conflict, Unprocessable, TooManyRequests),
)
def submit_job(
    spec: JobSpec,
    response: Response,
    tenant: CurrentTenant,
    session: SessionDep,
    queue: JobQueueDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    """Validate the spec against the teacher's signature and the dataset, then queue the job.

    A spec the teacher or dataset cannot serve (shape mismatch, labels needed but
    absent, a student that cannot read the inputs) is a 422 naming the field.
    A replayed ``Idempotency-Key`` answers with the original job and the header
    ``Idempotent-Replayed: true``.
    """
    job, created = service.submit_job(
        session,
        queue.send,
        tenant=tenant,
        spec=spec,
        idempotency_key=idempotency_key,
        allow_private_webhooks=settings.webhook_allow_private,
        max_active_jobs=settings.max_active_jobs_per_tenant,
    )
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.model_validate(job)


@router.get("", summary="List jobs, newest first", response_model=Page[JobOut])
async def list_jobs(
    request: Request,
    principal: CurrentPrincipal,
    page: Annotated[PageParams, Depends(page_params)],
    status: Annotated[
        list[JobStatus] | None, Query(description="only jobs in these statuses (repeatable)")
    ] = None,
) -> Response:
    """A page of the tenant's jobs; pass ``next_cursor`` as ``after`` for the next."""
    body = await run_database_call(
        request.app,
        partial(
            service.list_jobs_json,
            request.app.state.session_factory,
            tenant_id=principal.tenant_id,
            statuses=status or [],
            limit=page.limit,
            after=page.after,
        ),
    )
    return Response(body, media_type="application/json")


_JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    304: {"description": "`If-None-Match` names the job's current ETag: it has not changed"},
    **responses(NotFound, DatabaseBusy),
}


@router.get("/{job_id}", summary="Read a job", response_model=JobOut, responses=_JOB_RESPONSES)
async def get_job(
    job_id: str,
    request: Request,
    principal: CurrentPrincipal,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT_S,
            description="long poll: answer as soon as the job changes (from `If-None-Match`, "
            "or from its state when the request came), or after this many seconds",
        ),
    ] = 0,
    if_none_match: Annotated[
        str | None, Header(alias="If-None-Match", description="an ETag of this job")
    ] = None,
) -> Response:
    """Status, progress, latest metrics, ``attempt`` and ``error``, with an ``ETag``.

    With ``If-None-Match`` naming the current ETag the answer is 304 without a
    body. With ``wait=S`` (up to 60) the answer comes when the job changes, when
    it is finished, or after S seconds, whichever is first.
    """
    view = await poll_job(
        request.app,
        tenant_id=principal.tenant_id,
        job_id=job_id,
        wait_s=wait,
        if_none_match=if_none_match,
    )
    headers = job_read_headers(view.etag)
    if view.body is None:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(view.body, media_type="application/json", headers=headers)


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Cancel a job",
    responses=responses(NotFound, Conflict),
)
def cancel_job(job_id: str, tenant: CurrentTenant, session: SessionDep) -> JobOut:
    """A queued job is ``cancelled`` at once; a running one goes ``cancelling`` and stops at
    its next step. Repeating is harmless; a finished job answers 409."""
    return JobOut.model_validate(service.cancel_job(session, tenant=tenant, job_id=job_id))


_EVENTS_RESPONSES = {
    200: {
        "description": "a JSON page, or with `Accept: text/event-stream` Server-Sent Events",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobEventPage"}},
            EVENT_STREAM: {"schema": {"type": "string"}},
        },
    },
    **responses(NotFound),
}


@router.get(
    "/{job_id}/events",
    summary="Read or follow a job's event log",
    response_model=JobEventPage,
    responses=_EVENTS_RESPONSES,
)
async def job_events(
    job_id: str,
    request: Request,
    principal: CurrentPrincipal,
    after: Annotated[
        int, Query(ge=0, le=MAX_EVENT_ID, description="the last event id already seen")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="events per page")] = 100,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            description="SSE resume point: an event id (up to 2^63 - 1); anything else is a 422",
        ),
    ] = None,
) -> Response:
    """The append-only log: ``status``, ``stage``, ``progress``, ``evaluation``,
    ``checkpoint``, ``resumed``, ``warning`` and one final ``terminal`` event.

    With ``Accept: text/event-stream`` the log is streamed as Server-Sent Events
    (``id`` is the event id, ``event`` its type, ``data`` the event as JSON),
    resuming after ``Last-Event-ID``, with a keep-alive comment at least every
    15 s, and closing after the ``terminal`` event. A ``Last-Event-ID`` that can
    be no event id (not an integer, or above 2^63 - 1) is a 422 naming the
    header rather than a silent restart, so a broken client learns it at once.
    """
    app = request.app
    factory = app.state.session_factory
    if wants_event_stream(request):
        start = _resume_point(last_event_id, after)
        ident = await run_database_call(
            app,
            partial(service.owned_job_id, factory, tenant_id=principal.tenant_id, job_id=job_id),
        )
        return StreamingResponse(
            event_stream(app, ident, start),
            media_type=EVENT_STREAM,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    body = await run_database_call(
        app,
        partial(
            service.events_page_json,
            factory,
            tenant_id=principal.tenant_id,
            job_id=job_id,
            after=after,
            limit=limit,
        ),
    )
    return Response(body, media_type="application/json")


def _resume_point(last_event_id: str | None, after: int) -> int:
    if last_event_id is None:
        return after
    try:
        resume = int(last_event_id)
    except ValueError:
        resume = None
    if resume is None or resume > MAX_EVENT_ID:
        reason = "not an integer" if resume is None else f"above {MAX_EVENT_ID}"
        raise Unprocessable(
            "Last-Event-ID must be an event id",
            code="validation_error",
            errors=[FieldError(field="header.last-event-id", reason=reason)],
        )
    return max(0, resume)


@router.get("/{job_id}/artifacts", summary="List a job's artifacts", responses=responses(NotFound))
def list_artifacts(job_id: str, tenant: CurrentTenant, session: SessionDep) -> ArtifactList:
    """Name, size, sha256 and media type of every file the job produced."""
    rows = service.list_artifacts(session, tenant=tenant, job_id=job_id)
    return ArtifactList(data=[ArtifactOut.model_validate(r) for r in rows])


@router.get(
    "/{job_id}/artifacts/{name}",
    summary="Download one artifact",
    response_class=Response,
    responses=CONTENT_RESPONSES,
)
def download_artifact(
    job_id: str,
    name: str,
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    storage: StorageDep,
) -> Response:
    """The file, with ETag (its sha256), Range and Content-Disposition."""
    found = service.get_artifact(session, tenant=tenant, job_id=job_id, name=name)
    return content_response(
        request,
        storage,
        found.storage_key,
        sha256=found.sha256,
        size=found.bytes,
        filename=found.name,
        media_type=found.media_type,
    )

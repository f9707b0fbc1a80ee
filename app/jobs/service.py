"""Jobs: submission (validated against the teacher and dataset), reading, cancellation.

The job row and its first event are written in the request's transaction; the
message to the workers, which carries only the job id, is sent once that
transaction commits. State changes go through :func:`change_status`, which
appends the matching event in the same transaction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import Engine, RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.auth.models import Tenant
from app.datasets.models import Dataset
from app.datasets.repository import DatasetRepository
from app.db import after_commit, utcnow
from app.display_names import has_control_characters
from app.errors import (
    Conflict,
    FieldError,
    NotFound,
    TooManyRequests,
    Unprocessable,
    echo,
    public_message,
)
from app.jobs.models import (
    ACTIVE,
    CANCELLED,
    CANCELLING,
    FAILED,
    QUEUED,
    RUNNING,
    TERMINAL,
    Job,
    JobArtifact,
    JobEvent,
)
from app.jobs.repository import JobRepository, JobStatusReads
from app.jobs.schemas import JobEventOut, JobEventPage, JobOut
from app.models.models import TeacherModel
from app.models.repository import ModelRepository
from app.pagination import Cursor, Page
from app.storage import StoredObject
from app.webhooks import service as webhooks
from worker.engine import planning
from worker.engine.compatibility import TEST_SET_FIELD, DataFacts, check_job, check_test_set
from worker.engine.errors import EngineError
from worker.engine.signature import TeacherSignature
from worker.engine.spec import JobSpec

log = logging.getLogger(__name__)

#: Seconds a tenant over its job quota is told to wait (jobs take minutes).
QUOTA_RETRY_AFTER_S = 30

#: Sends a job's id to the workers (``app.state.job_queue``).
SendJob = Callable[[uuid.UUID], None]


def spec_digest(spec: JobSpec) -> str:
    """sha256 of the spec in canonical JSON: equal for bodies that mean the same job."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _body_error(detail: str, *, code: str, field: str) -> Unprocessable:
    return Unprocessable(
        detail, code=code, errors=[FieldError(field=f"body.{field}", reason=detail)]
    )


def _input(
    row: TeacherModel | Dataset | None, *, field: str, what: str, given: str
) -> TeacherModel | Dataset:
    if row is None:
        raise _body_error(f"no {what} {echo(given)}", code=f"{what}_not_found", field=field)
    if row.status == "invalid":
        detail = f"{what} {given} is invalid: {invalid_reason(row)}"
        raise _body_error(detail, code=f"{what}_invalid", field=field)
    return row


def invalid_reason(row: TeacherModel | Dataset) -> str:
    """Why an ``invalid`` model or dataset could not be read."""
    return str((row.error or {}).get("message", "it could not be read"))


def job_inputs(session: Session, job: Job) -> tuple[TeacherModel | None, Dataset | None]:
    """The job's teacher and dataset (``None`` for one deleted since)."""
    teacher = session.get(TeacherModel, job.teacher_model_id) if job.teacher_model_id else None
    dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
    return teacher, dataset


def job_test_set(session: Session, job: Job) -> Dataset | None:
    """The dataset the job reports on instead of a test split (``None`` for none, or one
    deleted since: compare with the spec's ``evaluation.test_dataset_id``)."""
    return session.get(Dataset, job.test_dataset_id) if job.test_dataset_id else None


def lost_test_set(job: Job, test_set: Dataset | None) -> bool:
    """Whether the job's spec names a test set that is gone (deleted since)."""
    named = (job.spec.get("evaluation") or {}).get("test_dataset_id")
    return named is not None and test_set is None


def submit_job(
    session: Session,
    send: SendJob,
    *,
    tenant: Tenant,
    spec: JobSpec,
    idempotency_key: str | None,
    allow_private_webhooks: bool = False,
    max_active_jobs: int | None = None,
) -> tuple[Job, bool]:
    """Validate ``spec`` against its teacher and dataset and queue a job; ``(job, created)``.

    With an ``idempotency_key`` already used for the same spec, returns that job
    (``created`` false); used for another spec, raises :class:`Conflict`.
    Engine checks that fail become 422 problems naming the spec field. A tenant
    with ``max_active_jobs`` jobs queued, running or cancelling gets
    :class:`TooManyRequests` (replays still answer). The job's id is sent to the
    workers only once the caller's transaction commits.
    """
    digest = spec_digest(spec)
    jobs = JobRepository(session)
    if idempotency_key is not None and has_control_characters(idempotency_key):
        raise Unprocessable(
            "Idempotency-Key must not hold control characters",
            code="validation_error",
            errors=[FieldError(field="header.idempotency-key", reason="control characters")],
        )
    webhooks.check_webhook_url(spec.webhook_url, allow_private=allow_private_webhooks)
    if idempotency_key is not None:
        existing = jobs.by_idempotency_key(tenant.id, idempotency_key)
        if existing is not None:
            return _replay(existing, digest), False
    if max_active_jobs is not None:
        _refuse_over_quota(jobs, tenant, max_active_jobs)
    teacher, dataset, test_set, task = _submitted_inputs(session, tenant, spec)
    job = Job(
        warnings=preflight_warnings(spec, teacher, dataset) if task is not None else None,
        id=uuid.uuid4(),
        tenant_id=tenant.id,
        teacher_model_id=teacher.id,
        dataset_id=dataset.id,
        test_dataset_id=test_set.id if test_set is not None else None,
        status=QUEUED,
        spec=spec.model_dump(mode="json"),
        task=task,
        attempt=0,
        partial=False,
        idempotency_key=idempotency_key,
        request_sha256=digest,
    )
    try:
        with session.begin_nested():
            jobs.add(job)
    except IntegrityError:
        # Another request with the same key committed first.
        if idempotency_key is None:
            raise
        raced = jobs.by_idempotency_key(tenant.id, idempotency_key)
        if raced is None:
            raise
        return _replay(raced, digest), False
    logged = jobs.add_event(job.id, "status", {"status": QUEUED}, attempt=0)
    webhooks.schedule_deliveries(session, job, logged)
    job_id = job.id
    after_commit(session, lambda: send(job_id))
    return job, True


def _refuse_over_quota(jobs: JobRepository, tenant: Tenant, max_active_jobs: int) -> None:
    # Locked, then counted: of two racing submissions the second counts the first's job.
    jobs.lock_submissions(tenant.id)
    if jobs.count_in(tenant.id, ACTIVE) >= max_active_jobs:
        raise TooManyRequests(
            f"this tenant already has {max_active_jobs} jobs queued or running, its limit; "
            "wait for one to finish or cancel one",
            code="job_quota_exceeded",
            headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)},
        )


def _submitted_inputs(
    session: Session, tenant: Tenant, spec: JobSpec
) -> tuple[
    TeacherModel | Dataset, TeacherModel | Dataset, TeacherModel | Dataset | None, str | None
]:
    """The spec's teacher, dataset and test set if it names one (422 if missing or invalid),
    and the job's task once all are inspected (``None`` while one is ``processing``)."""
    teacher = _input(
        ModelRepository(session).lookup(tenant.id, spec.teacher_model_id),
        field="teacher_model_id",
        what="model",
        given=spec.teacher_model_id,
    )
    dataset = _input(
        DatasetRepository(session).lookup(tenant.id, spec.dataset_id),
        field="dataset_id",
        what="dataset",
        given=spec.dataset_id,
    )
    test_set = None
    given = spec.evaluation.test_dataset_id
    if given is not None:
        test_set = _input(
            DatasetRepository(session).lookup(tenant.id, given),
            field=TEST_SET_FIELD,
            what="dataset",
            given=given,
        )
        if test_set.id == dataset.id:
            raise _body_error(
                "evaluation.test_dataset_id names the transfer set itself; the test set must "
                "be a dataset of other rows, or leave it out to hold out a test split",
                code="test_set_is_transfer_set",
                field=TEST_SET_FIELD,
            )
    inputs = (teacher, dataset) if test_set is None else (teacher, dataset, test_set)
    if any(row.status != "ready" for row in inputs):
        return teacher, dataset, test_set, None
    assert isinstance(teacher, TeacherModel) and isinstance(dataset, Dataset)
    assert test_set is None or isinstance(test_set, Dataset)
    return teacher, dataset, test_set, _check(spec, teacher, dataset, test_set)


def _check(
    spec: JobSpec, teacher: TeacherModel, dataset: Dataset, test_set: Dataset | None = None
) -> str:
    """The engine's checks of the job on its inputs' descriptions (422 naming the field at
    fault); returns the task."""
    assert teacher.signature is not None and dataset.summary is not None
    signature = TeacherSignature.from_dict(teacher.signature)
    facts = DataFacts.from_summary(dataset.summary)
    try:
        task = check_job(spec, signature, facts)
        if test_set is not None:
            assert test_set.summary is not None
            check_test_set(signature, facts, DataFacts.from_summary(test_set.summary))
        return task
    except EngineError as exc:
        raise _body_error(exc.message, code=exc.code, field=exc.field or "spec") from None


def preflight_warnings(
    spec: JobSpec, teacher: TeacherModel | Dataset, dataset: TeacherModel | Dataset
) -> list[dict[str, str]]:
    """The job's pre-flight warnings (``[{code, message, field}]``) from the teacher's signature
    and the dataset's summary: too few steps, a time budget likely to cut the run short, or
    too few sentences for a text student."""
    assert isinstance(teacher, TeacherModel) and isinstance(dataset, Dataset)
    assert teacher.signature is not None and dataset.summary is not None
    signature = TeacherSignature.from_dict(teacher.signature)
    summary = dataset.summary
    warnings = planning.preflight_warnings(
        spec,
        rows=int(summary.get("rows") or 0),
        modality=str(summary.get("modality")),
        feature_shape=summary.get("feature_shape"),
        teacher_parameters=signature.parameters,
        teacher_bytes=signature.bytes,
    )
    return [w.to_dict() for w in warnings]


def _replay(existing: Job, digest: str) -> Job:
    if existing.request_sha256 != digest:
        raise Conflict(
            "this Idempotency-Key was used for a different job spec",
            code="idempotency_key_reused",
            errors=[FieldError(field="header.idempotency-key", reason="reused for another body")],
        )
    return existing


def get_job(session: Session, *, tenant: Tenant, job_id: str) -> Job:
    """The tenant's job ``job_id``; :class:`NotFound` otherwise."""
    return JobRepository(session).get_owned(tenant.id, job_id)


@dataclass(frozen=True)
class JobView:
    """A job as a status read sees it: its ETag, its status and, for a full read, its JSON."""

    etag: str
    status: str
    body: bytes | None = None


def job_etag(version: RowMapping) -> str:
    """The job's entity tag: it changes with every write of the job (status, progress,
    metrics, error all set ``updated_at``) and with its status and attempt."""
    stamp = f"{version['updated_at'].isoformat()}|{version['status']}|{version['attempt']}"
    return 'W/"' + hashlib.sha256(stamp.encode()).hexdigest()[:20] + '"'


def parse_job_id(job_id: str) -> uuid.UUID:
    """``job_id`` as a UUID; :class:`NotFound` when malformed (it names no job)."""
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise NotFound(f"no job {job_id!r}", code="job_not_found") from None


def read_job_view(engine: Engine, *, tenant_id: uuid.UUID, job_id: str, full: bool) -> JobView:
    """The tenant's job ``job_id`` in one query: its ETag and status, and its JSON if ``full``.

    ``engine`` should autocommit, so the read is one round trip; :class:`NotFound`
    for a malformed id or another tenant's job.
    """
    ident = parse_job_id(job_id)
    with engine.connect() as connection:
        if full:
            row = JobStatusReads(connection).row(tenant_id, ident)
        else:
            row = JobStatusReads(connection).version(tenant_id, ident)
    if row is None:
        raise NotFound(f"no job {job_id!r}", code="job_not_found")
    body = JobOut.model_validate(dict(row)).model_dump_json().encode() if full else None
    return JobView(job_etag(row), row["status"], body)


def list_jobs_json(
    factory: sessionmaker[Session],
    *,
    tenant_id: uuid.UUID,
    statuses: Collection[str],
    limit: int,
    after: Cursor | None,
) -> bytes:
    """A page of the tenant's jobs as JSON, read and serialised in one short session."""
    with factory() as session:
        rows, cursor = JobRepository(session).page_by_status(
            tenant_id, statuses=statuses, limit=limit, after=after
        )
        page = Page[JobOut](
            data=[JobOut.model_validate(r) for r in rows],
            next_cursor=None if cursor is None else cursor.encode(),
        )
    return page.model_dump_json().encode()


def events_page_json(
    factory: sessionmaker[Session], *, tenant_id: uuid.UUID, job_id: str, after: int, limit: int
) -> bytes:
    """Up to ``limit`` of the tenant's job's events after id ``after``, as a JSON page."""
    with factory() as session:
        jobs = JobRepository(session)
        job = jobs.get_owned(tenant_id, job_id)
        events = jobs.events_after(job.id, after, limit)
        page = JobEventPage(
            data=[JobEventOut.model_validate(e) for e in events],
            next_cursor=str(events[-1].id) if len(events) == limit else None,
        )
    return page.model_dump_json().encode()


def owned_job_id(factory: sessionmaker[Session], *, tenant_id: uuid.UUID, job_id: str) -> uuid.UUID:
    """The id of the tenant's job ``job_id``; :class:`NotFound` otherwise."""
    with factory() as session:
        return JobRepository(session).get_owned(tenant_id, job_id).id


def list_jobs(
    session: Session,
    *,
    tenant: Tenant,
    statuses: Collection[str],
    limit: int,
    after: Cursor | None,
) -> tuple[Sequence[Job], Cursor | None]:
    """A page of the tenant's jobs (in ``statuses`` if any given), newest first."""
    return JobRepository(session).page_by_status(
        tenant.id, statuses=statuses, limit=limit, after=after
    )


def change_status(
    session: Session,
    job: Job,
    status: str,
    *,
    from_statuses: Collection[str],
    fence: int | None = None,
    event: dict[str, Any] | None = None,
    **values: Any,
) -> bool:
    """Move ``job`` to ``status`` if it is in ``from_statuses``, logging the change.

    ``fence``, when given, is the attempt the caller runs: the change is refused
    once another attempt owns the job. A terminal status is logged as the
    ``terminal`` event, the last of the log but for webhook deliveries of it.
    Returns whether the job changed; ``job`` is refreshed either way.
    """
    if status in TERMINAL:
        values.setdefault("finished_at", utcnow())
    if values.get("error") is not None:
        values["error"] = _public_error(values["error"])
    event = {k: _public_error(v) if k == "error" and v else v for k, v in (event or {}).items()}
    if isinstance(event.get("message"), str):
        event["message"] = public_message(event["message"])
    jobs = JobRepository(session)
    changed = jobs.transition(
        job.id, from_statuses=from_statuses, fence=fence, status=status, **values
    )
    session.refresh(job)
    if changed:
        kind = "terminal" if status in TERMINAL else "status"
        data = {"status": status, **event}
        logged = jobs.add_event(job.id, kind, data, attempt=job.attempt)
        webhooks.schedule_deliveries(session, job, logged)
    return changed


def _public_error(error: dict[str, Any]) -> dict[str, Any]:
    """A job error as clients see it (the job, its events, webhooks): no server paths or
    tenant ids, and no input echoed at length."""
    message = error.get("message")
    return {**error, "message": public_message(message) if isinstance(message, str) else message}


def fail_queued(
    session: Session, job: Job, *, code: str, message: str, field: str | None = None
) -> bool:
    """Fail a job that never started (its inputs turned out unusable); whether it changed."""
    error = {"code": code, "message": message, "field": field}
    return change_status(
        session, job, FAILED, from_statuses=[QUEUED], error=error, event={"error": error}
    )


def release_waiting_jobs(session: Session, send: SendJob, row: TeacherModel | Dataset) -> None:
    """Settle the queued jobs that waited for ``row`` to be inspected.

    If ``row`` is invalid they fail with its error. Otherwise each job whose
    other input is ready too is checked as a submission would have been (a
    failed check fails the job with the engine's code) and sent after commit.
    """
    what = "model" if isinstance(row, TeacherModel) else "dataset"
    for job in JobRepository(session).queued_using(row):
        if row.status == "invalid":
            reason = invalid_reason(row)
            as_test_set = isinstance(row, Dataset) and job.test_dataset_id == row.id
            fail_queued(
                session,
                job,
                code=f"{what}_invalid",
                message=f"the {'test ' if as_test_set else ''}{what} is invalid: {reason}",
                field=TEST_SET_FIELD if as_test_set else None,
            )
            continue
        teacher, dataset = job_inputs(session, job)
        test_set = job_test_set(session, job)
        if teacher is None or dataset is None or lost_test_set(job, test_set):
            continue
        if any(r.status != "ready" for r in (teacher, dataset, test_set) if r is not None):
            # The other inputs' inspections release the job when they end.
            continue
        try:
            spec = JobSpec.model_validate(job.spec)
            job.task = _check(spec, teacher, dataset, test_set)
            job.warnings = preflight_warnings(spec, teacher, dataset)
        except Unprocessable as exc:
            field = exc.errors[0].field.removeprefix("body.") if exc.errors else None
            fail_queued(session, job, code=exc.code, message=exc.detail, field=field)
            continue
        after_commit(session, partial(send, job.id))


def cancel_job(session: Session, *, tenant: Tenant, job_id: str) -> Job:
    """Cancel a queued job at once, or ask a running one to stop; harmless when repeated.

    A finished job cannot be cancelled: :class:`Conflict`.
    """
    job = get_job(session, tenant=tenant, job_id=job_id)
    if change_status(session, job, CANCELLED, from_statuses=[QUEUED]):
        return job
    if change_status(session, job, CANCELLING, from_statuses=[RUNNING]):
        return job
    if job.status in (CANCELLING, CANCELLED):
        return job
    raise Conflict(f"job {job_id} already {job.status}", code="job_finished")


def list_events(
    session: Session, *, tenant: Tenant, job_id: str, after: int, limit: int
) -> tuple[Job, Sequence[JobEvent]]:
    """The tenant's job and up to ``limit`` of its events after id ``after``."""
    job = get_job(session, tenant=tenant, job_id=job_id)
    return job, JobRepository(session).events_after(job.id, after, limit)


def list_artifacts(session: Session, *, tenant: Tenant, job_id: str) -> Sequence[JobArtifact]:
    """The artifacts of the tenant's job ``job_id``."""
    job = get_job(session, tenant=tenant, job_id=job_id)
    return JobRepository(session).artifacts(job.id)


def get_artifact(session: Session, *, tenant: Tenant, job_id: str, name: str) -> JobArtifact:
    """The artifact ``name`` of the tenant's job ``job_id``; :class:`NotFound` otherwise."""
    job = get_job(session, tenant=tenant, job_id=job_id)
    # No artifact is named with control characters (and PostgreSQL cannot compare a NUL).
    found = None if has_control_characters(name) else JobRepository(session).artifact(job.id, name)
    if found is None:
        raise NotFound(f"job {job_id} has no artifact {name!r}", code="artifact_not_found")
    return found


def refuse_if_in_use(session: Session, used: TeacherModel | Dataset) -> None:
    """:class:`Conflict` if a queued or running job still needs the model or dataset ``used``."""
    what = "model" if isinstance(used, TeacherModel) else "dataset"
    if JobRepository(session).any_using(used, ACTIVE):
        raise Conflict(
            f"a queued or running job uses this {what}; cancel it or wait for it to finish",
            code=f"{what}_in_use",
        )


def artifact_key(job: Job, name: str) -> str:
    """Where the job's artifact ``name`` is stored: under its attempt, so two attempts never
    write the same file."""
    return f"tenants/{job.tenant_id.hex}/jobs/{job.id.hex}/attempt-{job.attempt}/{name}"


def add_artifact(
    session: Session, job: Job, stored: StoredObject, *, name: str, media: str
) -> None:
    """Record a stored artifact of ``job``."""
    JobRepository(session).add_artifact(
        JobArtifact(
            job_id=job.id,
            name=name,
            bytes=stored.size,
            sha256=stored.sha256,
            media_type=media,
            storage_key=stored.key,
        )
    )

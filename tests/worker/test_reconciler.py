"""The reconciler, one pass at a time: expired leases, lost job messages, lost inspections."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import utcnow
from app.jobs.models import Job, JobEvent
from app.main import create_app
from tests.app.conftest import Tenants
from tests.app.factories import (
    broker_folder,
    npz_dataset,
    queued_job_ids,
    queued_tasks,
    tiny_onnx_classifier,
)
from worker.engine.spec import JobSpec
from worker.reconciler import reconcile
from worker.runner import hard_time_limit_s

#: Past the reconciler's grace period for messages on their way.
LATER = timedelta(seconds=Settings().resend_grace_s + 1)


@pytest.fixture
def job_of(client: TestClient, tenants: Tenants) -> Callable[[], str]:
    """Submit a job on a fresh teacher and dataset of acme's; returns its id."""
    model = client.post(
        "/v1/models", headers=tenants.acme, files={"file": ("t.onnx", tiny_onnx_classifier())}
    ).json()
    dataset = client.post(
        "/v1/datasets", headers=tenants.acme, files={"file": ("d.npz", npz_dataset())}
    ).json()

    def submit() -> str:
        body = {"teacher_model_id": model["id"], "dataset_id": dataset["id"]}
        return client.post("/v1/jobs", headers=tenants.acme, json=body).json()["id"]

    return submit


def empty_broker(settings: Settings) -> None:
    """What a broker restart without persistence leaves."""
    for message in (broker_folder(settings) / "queue").glob("*.msg"):
        message.unlink()


def set_job(engine: sa.Engine, job_id: str, **values: Any) -> None:
    with Session(engine) as session, session.begin():
        session.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(**values))


def job(client: TestClient, tenants: Tenants, job_id: str) -> dict[str, Any]:
    return client.get(f"/v1/jobs/{job_id}", headers=tenants.acme).json()


def last_event(client: TestClient, tenants: Tenants, job_id: str) -> dict[str, Any]:
    return client.get(f"/v1/jobs/{job_id}/events", headers=tenants.acme).json()["data"][-1]


def test_an_expired_lease_requeues_the_job_until_its_attempts_run_out(
    client: TestClient,
    tenants: Tenants,
    job_of: Callable[[], str],
    engine: sa.Engine,
    settings: Settings,
) -> None:
    lost, held = job_of(), job_of()
    empty_broker(settings)
    now = utcnow()
    running = {"status": "running", "lease_owner": "gone:1"}
    set_job(engine, lost, **running, attempt=1, lease_expires_at=now - timedelta(seconds=1))
    set_job(engine, held, **running, attempt=1, lease_expires_at=now + timedelta(minutes=1))

    done = reconcile(settings, now=now)
    assert [str(i) for i in done.requeued] == [lost]
    requeued = job(client, tenants, lost)
    assert requeued["status"] == "queued" and requeued["attempt"] == 1
    assert last_event(client, tenants, lost)["data"] == {
        "status": "queued",
        "reason": "lease_expired",
        "lease_owner": "gone:1",
    }
    assert queued_job_ids(broker_folder(settings)) == [lost]
    assert job(client, tenants, held)["status"] == "running"
    # A second pass has nothing to do.
    again = reconcile(settings, now=now)
    assert again.requeued == again.failed == again.resent == []

    set_job(engine, lost, **running, attempt=3, lease_expires_at=now - timedelta(seconds=1))
    done = reconcile(settings, now=now)
    assert [str(i) for i in done.failed] == [lost]
    failed = job(client, tenants, lost)
    assert failed["status"] == "failed" and failed["error"]["code"] == "max_attempts_exceeded"
    terminal = last_event(client, tenants, lost)
    assert terminal["type"] == "terminal" and terminal["data"]["error"]["code"] == (
        "max_attempts_exceeded"
    )
    assert queued_job_ids(broker_folder(settings)) == [lost]  # no new message


def test_a_cancelling_job_whose_worker_died_ends_cancelled(
    client: TestClient,
    tenants: Tenants,
    job_of: Callable[[], str],
    engine: sa.Engine,
    settings: Settings,
) -> None:
    job_id = job_of()
    past = utcnow() - timedelta(seconds=1)
    set_job(engine, job_id, status="cancelling", attempt=1, lease_expires_at=past)
    assert [str(i) for i in reconcile(settings).cancelled] == [job_id]
    assert job(client, tenants, job_id)["status"] == "cancelled"


def test_queued_jobs_without_a_message_are_sent_again(
    client: TestClient, tenants: Tenants, job_of: Callable[[], str], settings: Settings
) -> None:
    with_message, lost = job_of(), job_of()
    messages = sorted(
        (broker_folder(settings) / "queue").glob("*.msg"), key=lambda p: p.stat().st_mtime_ns
    )
    messages[1].unlink()  # the broker lost the second job's message
    assert queued_job_ids(broker_folder(settings)) == [with_message]

    # Within the grace period the message may still be on its way: left alone.
    assert reconcile(settings).resent == []
    done = reconcile(settings, now=utcnow() + LATER)
    assert [str(i) for i in done.resent] == [lost]
    assert sorted(queued_job_ids(broker_folder(settings))) == sorted([with_message, lost])
    assert reconcile(settings, now=utcnow() + LATER).resent == []


def test_uploads_left_processing_are_inspected_again_and_their_jobs_wait(
    tenants: Tenants, settings: Settings
) -> None:
    deferring = settings.model_copy(update={"inline_inspection_max_bytes": 16})
    with TestClient(create_app(deferring)) as api:
        model = api.post(
            "/v1/models", headers=tenants.acme, files={"file": ("t", tiny_onnx_classifier())}
        ).json()
        dataset = api.post(
            "/v1/datasets", headers=tenants.acme, files={"file": ("d", npz_dataset())}
        ).json()
        body = {"teacher_model_id": model["id"], "dataset_id": dataset["id"]}
        waiting = api.post("/v1/jobs", headers=tenants.acme, json=body).json()
    empty_broker(deferring)

    done = reconcile(deferring, now=utcnow() + LATER)
    assert sorted(str(i) for i in done.reinspected) == sorted([model["id"], dataset["id"]])
    # The job waits for its inputs; their inspection releases it, not the reconciler.
    assert done.resent == []
    tasks = queued_tasks(broker_folder(deferring))
    assert sorted(args[0] for _, args in tasks) == ["datasets", "models"]
    assert waiting["status"] == "queued"


def test_an_attempt_lost_past_its_hard_time_limit_fails_the_job_instead_of_rerunning(
    client: TestClient,
    tenants: Tenants,
    job_of: Callable[[], str],
    engine: sa.Engine,
    settings: Settings,
) -> None:
    # What the kernel's deadline leaves when native code kept the limit's thread from
    # running: the pool process is gone, the lease runs out, nothing was written.
    past, within = job_of(), job_of()
    empty_broker(settings)
    started = utcnow()
    for job_id in (past, within):
        set_job(engine, job_id, status="running", lease_owner="gone:1", attempt=1)
        with Session(engine) as session, session.begin():
            session.add(
                JobEvent(
                    job_id=uuid.UUID(job_id), type="status", attempt=1, data={}, created_at=started
                )
            )
    limit = hard_time_limit_s(JobSpec.model_validate(job_spec(engine, past)), settings)
    now = started + timedelta(seconds=limit + 5)
    set_job(engine, past, lease_expires_at=now - timedelta(seconds=1))
    set_job(engine, within, lease_expires_at=now - timedelta(seconds=1))
    # The other attempt began only a minute ago: an ordinary lost worker.
    with Session(engine) as session, session.begin():
        session.execute(
            update(JobEvent)
            .where(JobEvent.job_id == uuid.UUID(within))
            .values(created_at=now - timedelta(minutes=1))
        )

    done = reconcile(settings, now=now)
    assert [str(i) for i in done.failed] == [past]
    assert [str(i) for i in done.requeued] == [within]
    failed = job(client, tenants, past)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "time_budget_exceeded"
    assert failed["error"]["field"] == "training.max_minutes"
    assert f"{limit:.0f} s" in failed["error"]["message"]


def job_spec(engine: sa.Engine, job_id: str) -> dict[str, Any]:
    with Session(engine) as session:
        found = session.get(Job, uuid.UUID(job_id))
        assert found is not None
        return dict(found.spec)

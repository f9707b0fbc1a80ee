"""``/v1/jobs`` in-process: submission checks, idempotency, listing, cancellation, events.

No worker runs here: jobs stay queued, and their messages wait in the test's
filesystem broker folder, where the tests read them.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from app.config import Settings
from app.jobs.models import MAX_EVENT_ID, Job
from tests.app.conftest import Tenants
from tests.app.databases import count_rows
from tests.app.factories import broker_folder, npz_dataset, queued_job_ids
from tests.app.http import all_pages, assert_problem


def set_status(engine: sa.Engine, job_id: str, status: str) -> None:
    """Put a job in ``status`` as a worker would have."""
    with Session(engine) as session, session.begin():
        session.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(status=status))


def test_submit_queues_the_job_and_sends_only_its_id(
    client: TestClient, tenants: Tenants, inputs: dict[str, str], settings: Settings
) -> None:
    response = client.post("/v1/jobs", headers=tenants.acme, json={**inputs})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["attempt"] == 0
    assert job["task"] == "classification"
    assert job["spec"]["training"]["epochs"] == "auto"  # defaults filled in
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert queued_job_ids(broker_folder(settings)) == [job["id"]]

    events = client.get(f"/v1/jobs/{job['id']}/events", headers=tenants.acme).json()
    assert [(e["type"], e["data"]) for e in events["data"]] == [("status", {"status": "queued"})]
    assert client.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json() == job


@pytest.mark.parametrize(
    ("change", "status", "code", "field"),
    [
        ({"training": {"epochs": 0}}, 422, "validation_error", "body.training.epochs"),
        (
            {"student": {"architecture": "gan"}},
            422,
            "validation_error",
            "body.student.architecture",
        ),
        ({"surprise": 1}, 422, "validation_error", "body.surprise"),
        ({"teacher_model_id": str(uuid.uuid4())}, 422, "model_not_found", "body.teacher_model_id"),
        ({"dataset_id": "not-an-id"}, 422, "dataset_not_found", "body.dataset_id"),
        ({"student": {"architecture": "cnn"}}, 422, "spec_invalid", "body.student.architecture"),
        ({"task": "regression", "method": {"name": "mse"}}, None, None, None),
        ({"webhook_url": "ftp://example.com"}, 422, "validation_error", "body.webhook_url"),
    ],
)
def test_submit_names_the_field_at_fault(
    client: TestClient,
    tenants: Tenants,
    inputs: dict[str, str],
    engine: sa.Engine,
    settings: Settings,
    change: dict[str, Any],
    status: int | None,
    code: str | None,
    field: str | None,
) -> None:
    response = client.post("/v1/jobs", headers=tenants.acme, json={**inputs, **change})
    if status is None:
        # A classifier's probabilities may be regressed on: accepted.
        assert response.status_code == 202, response.text
        return
    assert code is not None
    body = assert_problem(response, status, code)
    assert field in [e["field"] for e in body["errors"]], body
    assert count_rows(engine, "jobs") == 0
    assert queued_job_ids(broker_folder(settings)) == []


def test_submit_checks_the_data_against_the_teacher(
    client: TestClient, tenants: Tenants, inputs: dict[str, str], engine: sa.Engine
) -> None:
    def dataset(data: bytes) -> str:
        created = client.post("/v1/datasets", headers=tenants.acme, files={"file": ("d.npz", data)})
        assert created.status_code == 201, created.text
        return created.json()["id"]

    wrong_shape = dataset(npz_dataset(features=5))
    body = assert_problem(
        client.post("/v1/jobs", headers=tenants.acme, json={**inputs, "dataset_id": wrong_shape}),
        422,
        "dataset_invalid",
    )
    assert body["errors"][0]["field"] == "body.dataset_id" and "[5]" in body["detail"]

    unlabelled = dataset(npz_dataset(classes=None))
    body = assert_problem(
        client.post(
            "/v1/jobs",
            headers=tenants.acme,
            json={**inputs, "dataset_id": unlabelled, "evaluation": {"baseline": True}},
        ),
        422,
        "spec_invalid",
    )
    assert body["errors"][0]["field"] == "body.evaluation.baseline"

    too_many_classes = dataset(npz_dataset(classes=7))
    body = assert_problem(
        client.post(
            "/v1/jobs", headers=tenants.acme, json={**inputs, "dataset_id": too_many_classes}
        ),
        422,
        "dataset_invalid",
    )
    assert "out of range" in body["detail"]
    # Distillation needs no labels: the same unlabelled set is fine without a baseline.
    assert (
        client.post(
            "/v1/jobs", headers=tenants.acme, json={**inputs, "dataset_id": unlabelled}
        ).status_code
        == 202
    )
    assert count_rows(engine, "jobs") == 1


def test_idempotency_key_replays_and_refuses_another_body(
    client: TestClient, tenants: Tenants, inputs: dict[str, str], settings: Settings
) -> None:
    key = {"Idempotency-Key": "nightly-2026-11-27"}
    first = client.post("/v1/jobs", headers={**tenants.acme, **key}, json=inputs)
    again = client.post("/v1/jobs", headers={**tenants.acme, **key}, json=inputs)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    # Spelling out a default is the same job.
    explicit = {**inputs, "training": {"epochs": "auto"}}
    assert (
        client.post("/v1/jobs", headers={**tenants.acme, **key}, json=explicit).json()["id"]
        == first.json()["id"]
    )

    other = client.post(
        "/v1/jobs", headers={**tenants.acme, **key}, json={**inputs, "training": {"epochs": 3}}
    )
    body = assert_problem(other, 409, "idempotency_key_reused")
    assert body["errors"][0]["field"] == "header.idempotency-key"
    assert queued_job_ids(broker_folder(settings)) == [first.json()["id"]]
    # Keys are per tenant: globex may use the same one (for its own inputs).
    assert_problem(
        client.post("/v1/jobs", headers={**tenants.globex, **key}, json=inputs),
        422,
        "model_not_found",
    )


def test_list_pages_newest_first_and_filters_by_status(
    client: TestClient, tenants: Tenants, inputs: dict[str, str]
) -> None:
    ids = [
        client.post("/v1/jobs", headers=tenants.acme, json=inputs).json()["id"] for _ in range(5)
    ]
    cancelled = client.post(f"/v1/jobs/{ids[1]}/cancel", headers=tenants.acme)
    assert cancelled.json()["status"] == "cancelled"

    seen, pages = all_pages(client, "/v1/jobs", tenants.acme, limit=2)
    assert seen == ids[::-1] and pages == 3
    queued = client.get("/v1/jobs", headers=tenants.acme, params={"status": "queued"}).json()
    assert [j["id"] for j in queued["data"]] == [i for i in ids[::-1] if i != ids[1]]
    both = client.get(
        "/v1/jobs", headers=tenants.acme, params=[("status", "queued"), ("status", "cancelled")]
    ).json()
    assert len(both["data"]) == 5
    assert_problem(
        client.get("/v1/jobs", headers=tenants.acme, params={"status": "paused"}),
        422,
        "validation_error",
    )
    assert client.get("/v1/jobs", headers=tenants.globex).json() == {
        "data": [],
        "next_cursor": None,
    }


def test_cancel_queued_is_immediate_and_idempotent(
    client: TestClient, tenants: Tenants, inputs: dict[str, str], engine: sa.Engine
) -> None:
    job = client.post("/v1/jobs", headers=tenants.acme, json=inputs).json()
    url = f"/v1/jobs/{job['id']}/cancel"
    first = client.post(url, headers=tenants.acme)
    second = client.post(url, headers=tenants.acme)
    assert first.status_code == second.status_code == 202
    assert first.json()["status"] == second.json()["status"] == "cancelled"
    assert first.json()["finished_at"] is not None
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=tenants.acme).json()["data"]
    assert [e["type"] for e in events] == ["status", "terminal"]
    assert events[-1]["data"] == {"status": "cancelled"}

    for finished in ("succeeded", "failed"):
        other = client.post("/v1/jobs", headers=tenants.acme, json=inputs).json()
        set_status(engine, other["id"], finished)
        body = assert_problem(
            client.post(f"/v1/jobs/{other['id']}/cancel", headers=tenants.acme), 409, "job_finished"
        )
        assert finished in body["detail"]


def test_inputs_of_an_active_job_cannot_be_deleted(
    client: TestClient, tenants: Tenants, inputs: dict[str, str]
) -> None:
    job = client.post("/v1/jobs", headers=tenants.acme, json=inputs).json()
    model_url = f"/v1/models/{inputs['teacher_model_id']}"
    dataset_url = f"/v1/datasets/{inputs['dataset_id']}"
    assert_problem(client.delete(model_url, headers=tenants.acme), 409, "model_in_use")
    assert_problem(client.delete(dataset_url, headers=tenants.acme), 409, "dataset_in_use")
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenants.acme)
    assert client.delete(model_url, headers=tenants.acme).status_code == 204
    assert client.delete(dataset_url, headers=tenants.acme).status_code == 204
    kept = client.get(f"/v1/jobs/{job['id']}", headers=tenants.acme).json()
    assert kept["teacher_model_id"] is None and kept["status"] == "cancelled"


def test_events_page_after_a_cursor_and_stream_a_finished_job(
    client: TestClient, tenants: Tenants, inputs: dict[str, str]
) -> None:
    job = client.post("/v1/jobs", headers=tenants.acme, json=inputs).json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenants.acme)
    url = f"/v1/jobs/{job['id']}/events"
    everything = client.get(url, headers=tenants.acme).json()["data"]
    first = client.get(url, headers=tenants.acme, params={"limit": 1}).json()
    assert first["data"] == everything[:1] and first["next_cursor"] == str(everything[0]["id"])
    rest = client.get(url, headers=tenants.acme, params={"after": first["next_cursor"]}).json()
    assert rest["data"] == everything[1:] and rest["next_cursor"] is None

    stream = client.get(url, headers={**tenants.acme, "Accept": "text/event-stream"})
    assert stream.headers["content-type"].startswith("text/event-stream")
    messages = [m for m in stream.text.split("\n\n") if m.startswith("id:")]
    parsed = [dict(line.split(": ", 1) for line in m.splitlines()) for m in messages]
    assert [int(m["id"]) for m in parsed] == [e["id"] for e in everything]
    assert [m["event"] for m in parsed] == ["status", "terminal"]
    assert json.loads(parsed[-1]["data"]) == everything[-1]

    resumed = client.get(
        url,
        headers={
            **tenants.acme,
            "Accept": "text/event-stream",
            "Last-Event-ID": str(everything[0]["id"]),
        },
    )
    assert [m for m in resumed.text.split("\n\n") if m.startswith("id:")] == messages[1:]
    past_the_end = client.get(
        url,
        headers={
            **tenants.acme,
            "Accept": "text/event-stream",
            "Last-Event-ID": str(everything[-1]["id"]),
        },
    )
    assert "id:" not in past_the_end.text
    assert_problem(
        client.get(
            url,
            headers={**tenants.acme, "Accept": "text/event-stream", "Last-Event-ID": "x"},
        ),
        422,
        "validation_error",
    )


def test_event_ids_past_a_64_bit_integer_are_422_naming_the_field(
    client: TestClient, tenants: Tenants, inputs: dict[str, str]
) -> None:
    """Finding 10: ``?after=2**63`` overflowed both databases' BIGINT (a 500), and
    ``Last-Event-ID: 10^20`` cut the SSE stream after its headers."""
    job = client.post("/v1/jobs", headers=tenants.acme, json=inputs).json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenants.acme)
    url = f"/v1/jobs/{job['id']}/events"
    past = client.get(url, headers=tenants.acme, params={"after": MAX_EVENT_ID + 1})
    problem = assert_problem(past, 422, "validation_error")
    assert [e["field"] for e in problem["errors"]] == ["query.after"]
    last = client.get(url, headers=tenants.acme, params={"after": MAX_EVENT_ID})
    assert last.status_code == 200 and last.json() == {"data": [], "next_cursor": None}

    sse = {**tenants.acme, "Accept": "text/event-stream"}
    for unusable in (str(10**20), str(MAX_EVENT_ID + 1), "9" * 5000):
        refused = client.get(url, headers={**sse, "Last-Event-ID": unusable})
        problem = assert_problem(refused, 422, "validation_error")
        assert [e["field"] for e in problem["errors"]] == ["header.last-event-id"]
    # The largest id is a resume point after every event: the finished job's stream just ends.
    ended = client.get(url, headers={**sse, "Last-Event-ID": str(MAX_EVENT_ID)})
    assert ended.status_code == 200 and ended.text == "retry: 2000\n\n"


def test_artifacts_of_a_job_without_any(
    client: TestClient, tenants: Tenants, inputs: dict[str, str]
) -> None:
    job = client.post("/v1/jobs", headers=tenants.acme, json=inputs).json()
    listed = client.get(f"/v1/jobs/{job['id']}/artifacts", headers=tenants.acme)
    assert listed.status_code == 200 and listed.json() == {"data": []}
    assert_problem(
        client.get(f"/v1/jobs/{job['id']}/artifacts/student.onnx", headers=tenants.acme),
        404,
        "artifact_not_found",
    )

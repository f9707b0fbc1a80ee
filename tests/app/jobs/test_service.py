"""Job submission and its transaction: the job's id reaches the broker only after the commit."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.config import Settings
from tests.app.conftest import Tenants
from tests.app.databases import commits_refused, count_rows
from tests.app.factories import broker_folder, queued_job_ids
from tests.app.http import assert_problem, job_inputs


def test_a_submission_whose_commit_fails_leaves_no_message_in_the_broker(
    client: TestClient, tenants: Tenants, engine: sa.Engine, settings: Settings
) -> None:
    """The database itself refuses the COMMIT of the request's transaction.

    A deferred constraint is checked only at COMMIT, so the job's insert, its
    event and every flush succeed and the request gets as far as a real
    commit, which then fails: a message sent any time before the commit
    succeeded (at the insert, at a flush, instead of after commit) would be in
    the broker. A failure earlier in the request could not tell these apart.
    """
    ids = job_inputs(client, tenants.acme)
    folder = broker_folder(settings)

    with commits_refused(engine, "jobs"):
        refused = client.post("/v1/jobs", headers=tenants.acme, json=ids)
    assert_problem(refused, 500, "internal_error")
    assert count_rows(engine, "jobs") == 0
    assert queued_job_ids(folder) == []

    # The same submission, committed: its id is sent, once.
    accepted = client.post("/v1/jobs", headers=tenants.acme, json=ids)
    assert accepted.status_code == 202, accepted.text
    assert queued_job_ids(folder) == [accepted.json()["id"]]

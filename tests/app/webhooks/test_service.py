"""Webhooks on the API's side: URLs that would reach the service's own network are refused.

The delivery of webhooks is tested with the worker (``tests/worker/test_webhook_delivery.py``).
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.errors import Unprocessable
from app.webhooks.service import check_webhook_url
from tests.app.conftest import Tenants
from tests.app.databases import count_rows
from tests.app.http import assert_problem, job_inputs


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/latest",
        "http://[::1]/x",
        "http://10.0.0.5/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "http://localhost:8000/v1/jobs",
    ],
)
def test_submitting_a_webhook_url_inside_the_service_is_refused(
    client: TestClient, tenants: Tenants, engine: sa.Engine, url: str
) -> None:
    response = client.post(
        "/v1/jobs",
        headers=tenants.acme,
        json={**job_inputs(client, tenants.acme), "webhook_url": url},
    )
    body = assert_problem(response, 422, "webhook_url_forbidden")
    assert [e["field"] for e in body["errors"]] == ["body.webhook_url"]
    assert count_rows(engine, "jobs") == 0


def test_submitting_a_webhook_url_that_does_not_resolve_is_refused(
    client: TestClient, tenants: Tenants, engine: sa.Engine
) -> None:
    response = client.post(
        "/v1/jobs",
        headers=tenants.acme,
        json={**job_inputs(client, tenants.acme), "webhook_url": "http://nonexistent.invalid/"},
    )
    body = assert_problem(response, 422, "webhook_url_unresolvable")
    assert [e["field"] for e in body["errors"]] == ["body.webhook_url"]
    assert count_rows(engine, "jobs") == 0


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://8.8.8.8/hook", True),
        ("https://[2606:4700:4700::1111]/hook", True),
        ("http://100.64.0.1/", False),  # shared (carrier-grade NAT) space
        ("http://224.0.0.1/", False),  # multicast
        ("http://[::ffff:169.254.169.254]/", False),  # IPv4-mapped metadata address
        ("http://[64:ff9b::7f00:1]/", False),  # NAT64 of 127.0.0.1
        ("http://[2002:7f00:1::]/", False),  # 6to4 of 127.0.0.1
        ("http://[fe80::1]/", False),
        ("http://[fd00::1]/", False),
    ],
)
def test_check_webhook_url_judges_every_address_family(url: str, allowed: bool) -> None:
    # Address literals resolve without a network.
    if allowed:
        check_webhook_url(url, allow_private=False)
    else:
        with pytest.raises(Unprocessable) as refused:
            check_webhook_url(url, allow_private=False)
        assert refused.value.code == "webhook_url_forbidden"
    check_webhook_url(url, allow_private=True)
    check_webhook_url(None, allow_private=False)

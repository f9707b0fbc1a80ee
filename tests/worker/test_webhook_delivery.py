"""Webhook delivery: a real receiver on loopback gets every transition once, signed, in order.

Deliveries are sent by :func:`deliver_due`, called here as the periodic task
would; ``now`` is moved forward to make retries due. The tests run with
``webhook_allow_private`` on, since the receiver listens on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import utcnow
from app.main import create_app
from app.webhooks.models import WebhookDelivery
from tests.app.conftest import Tenants
from tests.app.http import job_inputs
from worker.webhook_delivery import deliver_due

#: The secret-looking part of the receiver's URL, which the job log must never show.
URL_TOKEN = "token=s3cret"


@dataclass
class Receiver:
    """A webhook endpoint on loopback that answers from a script (then 200) and keeps each POST."""

    server: ThreadingHTTPServer
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def url(self, host: str = "127.0.0.1") -> str:
        """The URL a job names to reach this receiver through ``host``."""
        return f"http://{host}:{self.port}/hooks/distillery?{URL_TOKEN}"

    def bodies(self) -> list[dict[str, Any]]:
        """The JSON bodies received, in order."""
        return [json.loads(body) for _, body in self.received]


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    """Starts receivers answering ``answers`` in turn (200 once they run out); stops them all."""
    servers: list[ThreadingHTTPServer] = []

    def start(answers: list[int] | None = None, delay_s: float = 0.0) -> Receiver:
        script = list(answers or [])
        lock = threading.Lock()
        holder: list[Receiver] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                time.sleep(delay_s)
                with lock:
                    code = script.pop(0) if script else 200
                    got = holder[0]
                    got.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    got.answered.append(code)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        holder.append(Receiver(server))
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return holder[0]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@dataclass(frozen=True)
class Private:
    """An app whose settings let webhooks reach loopback, and those settings."""

    client: TestClient
    settings: Settings


@pytest.fixture
def private(settings: Settings) -> Iterator[Private]:
    """The test app with ``webhook_allow_private`` on, for a receiver on 127.0.0.1."""
    allowed = settings.model_copy(
        update={"webhook_allow_private": True, "webhook_retry_base_s": 2.0}
    )
    with TestClient(create_app(allowed), raise_server_exceptions=False) as client:
        yield Private(client, allowed)


@pytest.fixture
def factory(engine: sa.Engine) -> sessionmaker[Session]:
    """Sessions as the periodic task opens them."""
    return sessionmaker(engine, expire_on_commit=False)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """The client deliveries go out with (no proxy from the environment)."""
    with httpx.Client(trust_env=False) as client:
        yield client


def submit(
    client: TestClient,
    headers: dict[str, str],
    webhook_url: str,
    ids: dict[str, str] | None = None,
) -> str:
    """Submit a job of the tenant's with ``webhook_url`` (on new inputs unless ``ids``); its id."""
    spec = {**(ids or job_inputs(client, headers)), "webhook_url": webhook_url}
    response = client.post("/v1/jobs", headers=headers, json=spec)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def cancel(client: TestClient, headers: dict[str, str], job_id: str) -> None:
    """Cancel a queued job (queued → cancelled)."""
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert response.status_code == 202 and response.json()["status"] == "cancelled"


def job_log(client: TestClient, headers: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    """The job's whole event log."""
    response = client.get(f"/v1/jobs/{job_id}/events", headers=headers, params={"limit": 1000})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def of_type(log: list[dict[str, Any]], *types: str) -> list[dict[str, Any]]:
    return [e for e in log if e["type"] in types]


def secret_of(client: TestClient, headers: dict[str, str]) -> str:
    response = client.get("/v1/webhook-secret", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["secret"]


def assert_signed(headers: dict[str, str], body: bytes, secret: str) -> None:
    """The delivery carries a fresh, valid v1 signature of its body and its event id."""
    timestamp = headers["distillery-timestamp"]
    assert abs(int(timestamp) - time.time()) < 300
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    assert hmac.compare_digest(headers["distillery-signature"], f"v1={expected.hexdigest()}")
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "Distillery-Webhooks/1"
    assert headers["distillery-event-id"] == str(json.loads(body)["id"])


def deliveries(engine: sa.Engine, job_id: str) -> list[WebhookDelivery]:
    """The job's deliveries, oldest event first."""
    with Session(engine) as session:
        return list(
            session.scalars(
                sa.select(WebhookDelivery)
                .where(WebhookDelivery.job_id == uuid.UUID(job_id))
                .order_by(WebhookDelivery.event_id)
            )
        )


def test_every_transition_is_delivered_once_signed_and_in_order(
    private: Private,
    tenants: Tenants,
    factory: sessionmaker[Session],
    http: httpx.Client,
    receiver: Callable[..., Receiver],
) -> None:
    hook = receiver()
    client, acme = private.client, tenants.acme
    # A host name, not an address: the attempt connects to the checked address with its Host.
    job_id = submit(client, acme, hook.url("localhost"))
    cancel(client, acme, job_id)

    assert deliver_due(factory, private.settings, client=http) == 2
    bodies = hook.bodies()
    assert [b["status"] for b in bodies] == ["queued", "cancelled"]
    log = job_log(client, acme, job_id)
    transitions = of_type(log, "status", "terminal")
    assert [b["id"] for b in bodies] == [e["id"] for e in transitions]
    assert [b["event"] for b in bodies] == transitions
    for body in bodies:
        assert body["type"] == "job.status" and body["job_id"] == job_id
        assert body["attempt"] == 0 and body["created_at"] == body["event"]["created_at"]
    secret = secret_of(client, acme)
    for headers, raw_body in hook.received:
        assert_signed(headers, raw_body, secret)
        assert headers["host"] == f"localhost:{hook.port}"

    webhook = of_type(job_log(client, acme, job_id), "webhook")
    assert [(w["data"]["event_id"], w["data"]["delivered"]) for w in webhook] == [
        (e["id"], True) for e in transitions
    ]
    for w in webhook:
        # The log names the receiver's origin only: its path and query may hold a token.
        assert w["data"]["url"] == f"http://localhost:{hook.port}"
        assert w["data"]["status_code"] == 200 and w["data"]["attempt"] == 1
        assert w["data"]["next_attempt_at"] is None
    assert URL_TOKEN not in json.dumps(webhook)

    # Delivered is done: a later run posts nothing again.
    assert deliver_due(factory, private.settings, client=http) == 0
    assert len(hook.received) == 2


def test_concurrent_runs_deliver_each_event_once_and_each_job_in_order(
    private: Private,
    tenants: Tenants,
    factory: sessionmaker[Session],
    receiver: Callable[..., Receiver],
) -> None:
    hook = receiver(delay_s=0.05)
    client, acme = private.client, tenants.acme
    ids = job_inputs(client, acme)
    jobs = [submit(client, acme, hook.url(), ids) for _ in range(6)]
    for job_id in jobs:
        cancel(client, acme, job_id)

    counts: list[int] = []

    def run() -> None:
        with httpx.Client(trust_env=False) as http:
            counts.append(deliver_due(factory, private.settings, client=http))

    runners = [threading.Thread(target=run) for _ in range(3)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join(60)
    assert sum(counts) == 12 and len(counts) == 3
    bodies = hook.bodies()
    assert sorted(b["id"] for b in bodies) == sorted({b["id"] for b in bodies})
    for job_id in jobs:
        assert [b["status"] for b in bodies if b["job_id"] == job_id] == ["queued", "cancelled"]


def test_a_failed_attempt_is_retried_when_due_and_holds_back_later_events(
    private: Private,
    tenants: Tenants,
    engine: sa.Engine,
    factory: sessionmaker[Session],
    http: httpx.Client,
    receiver: Callable[..., Receiver],
) -> None:
    hook = receiver([500])
    client, acme = private.client, tenants.acme
    job_id = submit(client, acme, hook.url())
    cancel(client, acme, job_id)
    start = utcnow()

    # queued gets the 500; cancelled must not overtake it, so it waits too.
    assert deliver_due(factory, private.settings, now=start, client=http) == 1
    assert [b["status"] for b in hook.bodies()] == ["queued"]
    queued, cancelled = deliveries(engine, job_id)
    assert (queued.status, queued.attempts, queued.last_status_code) == ("pending", 1, 500)
    assert queued.next_attempt_at == start + timedelta(seconds=2)
    assert (cancelled.status, cancelled.attempts) == ("pending", 0)

    # Not due yet: nothing goes out.
    assert deliver_due(factory, private.settings, now=start + timedelta(seconds=1)) == 0
    assert len(hook.received) == 1

    later = start + timedelta(seconds=3)
    assert deliver_due(factory, private.settings, now=later, client=http) == 2
    bodies = hook.bodies()
    assert [b["status"] for b in bodies] == ["queued", "queued", "cancelled"]
    assert hook.answered == [500, 200, 200]
    # The retry is the same event: receivers dedupe on its id.
    assert hook.received[0][1] == hook.received[1][1]
    secret = secret_of(client, acme)
    for headers, body in hook.received:
        assert_signed(headers, body, secret)
    assert [d.status for d in deliveries(engine, job_id)] == ["delivered", "delivered"]

    log = job_log(client, acme, job_id)
    queued_id, cancelled_id = (e["id"] for e in of_type(log, "status", "terminal"))
    webhook = [w["data"] for w in of_type(log, "webhook")]
    assert [
        (w["event_id"], w["attempt"], w.get("status_code"), w["delivered"]) for w in webhook
    ] == [
        (queued_id, 1, 500, False),
        (queued_id, 2, 200, True),
        (cancelled_id, 1, 200, True),
    ]
    assert datetime.fromisoformat(webhook[0]["next_attempt_at"]) == start + timedelta(seconds=2)


def test_a_delivery_fails_for_good_after_its_last_attempt(
    private: Private,
    tenants: Tenants,
    engine: sa.Engine,
    factory: sessionmaker[Session],
    http: httpx.Client,
    receiver: Callable[..., Receiver],
) -> None:
    hook = receiver([500, 503, 502])
    settings = private.settings.model_copy(
        update={"webhook_max_attempts": 3, "webhook_retry_base_s": 1.0}
    )
    client, acme = private.client, tenants.acme
    job_id = submit(client, acme, hook.url())
    now = utcnow()
    for _ in range(5):
        deliver_due(factory, settings, now=now, client=http)
        now += timedelta(seconds=301)
    assert hook.answered == [500, 503, 502]
    (delivery,) = deliveries(engine, job_id)
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("failed", 3, 502)
    webhook = [w["data"] for w in of_type(job_log(client, acme, job_id), "webhook")]
    assert [(w["attempt"], w["status_code"], w["delivered"]) for w in webhook] == [
        (1, 500, False),
        (2, 503, False),
        (3, 502, False),
    ]
    assert webhook[-1]["next_attempt_at"] is None

    # A delivery given up no longer holds back the job's later events.
    cancel(client, acme, job_id)
    assert deliver_due(factory, settings, now=now, client=http) == 1
    assert [b["status"] for b in hook.bodies()] == ["queued"] * 3 + ["cancelled"]
    assert deliver_due(factory, settings, now=now + timedelta(days=1), client=http) == 0


def test_an_unreachable_receiver_is_retried_with_the_error_logged(
    private: Private,
    tenants: Tenants,
    engine: sa.Engine,
    factory: sessionmaker[Session],
    http: httpx.Client,
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    client, acme = private.client, tenants.acme
    job_id = submit(client, acme, f"http://127.0.0.1:{port}/hook")
    start = utcnow()
    assert deliver_due(factory, private.settings, now=start, client=http) == 1
    later = start + timedelta(seconds=3)
    assert deliver_due(factory, private.settings, now=later, client=http) == 1
    (delivery,) = deliveries(engine, job_id)
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("pending", 2, None)
    assert delivery.last_error and "ConnectError" in delivery.last_error
    # Backoff doubles: 2 s after the first failure, 4 s after the second.
    assert delivery.next_attempt_at == later + timedelta(seconds=4)
    webhook = [w["data"] for w in of_type(job_log(client, acme, job_id), "webhook")]
    assert len(webhook) == 2
    for w in webhook:
        assert "status_code" not in w and not w["delivered"] and "ConnectError" in w["error"]


def test_a_url_that_now_points_inside_fails_without_being_posted(
    private: Private,
    tenants: Tenants,
    engine: sa.Engine,
    factory: sessionmaker[Session],
    http: httpx.Client,
    receiver: Callable[..., Receiver],
    settings: Settings,
) -> None:
    hook = receiver()
    job_id = submit(private.client, tenants.acme, hook.url())
    # Delivered under settings that refuse loopback, as if the name had moved inside since.
    assert deliver_due(factory, settings, client=http) == 1
    assert hook.received == []
    (delivery,) = deliveries(engine, job_id)
    assert (delivery.status, delivery.attempts) == ("failed", 1)
    (webhook,) = of_type(job_log(private.client, tenants.acme, job_id), "webhook")
    assert webhook["data"]["delivered"] is False and webhook["data"]["next_attempt_at"] is None
    assert "loopback" in webhook["data"]["error"]


def test_rotating_the_secret_changes_it_for_that_tenant_only(
    private: Private,
    tenants: Tenants,
    factory: sessionmaker[Session],
    http: httpx.Client,
    receiver: Callable[..., Receiver],
) -> None:
    client = private.client
    first = client.get("/v1/webhook-secret", headers=tenants.acme)
    assert first.headers["cache-control"] == "no-store"
    before, other = first.json()["secret"], secret_of(client, tenants.globex)
    assert len(before) >= 32 and before != other

    rotated = client.post("/v1/webhook-secret/rotate", headers=tenants.acme)
    assert rotated.status_code == 200, rotated.text
    after = rotated.json()["secret"]
    assert after != before and secret_of(client, tenants.acme) == after
    assert secret_of(client, tenants.globex) == other

    # Deliveries from now on are signed with the new secret.
    hook = receiver()
    submit(client, tenants.acme, hook.url())
    assert deliver_due(factory, private.settings, client=http) == 1
    ((headers, body),) = hook.received
    assert_signed(headers, body, after)

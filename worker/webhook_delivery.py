"""Webhook delivery: the periodic worker task that POSTs the outbox's due deliveries.

:func:`deliver_due` sends the deliveries :mod:`app.webhooks.service` wrote,
outside any transaction, and logs each attempt as a ``webhook`` event of the
job. Delivery is at least once: receivers dedupe on the ``Distillery-Event-Id``
header and verify ``Distillery-Signature``, an HMAC-SHA256 with the tenant's
secret over ``f"{timestamp}."`` and the body.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.orm import Session, sessionmaker

from app.auth.repository import AuthRepository
from app.config import Settings
from app.db import utcnow
from app.errors import Unprocessable
from app.jobs.models import Job, JobEvent
from app.jobs.repository import JobRepository
from app.jobs.schemas import JobEventOut
from app.webhooks.models import DELIVERED, FAILED, PENDING
from app.webhooks.repository import WebhookRepository
from app.webhooks.service import IPAddress, WebhookTarget, resolve_webhook_url

log = logging.getLogger(__name__)

USER_AGENT = "Distillery-Webhooks/1"
#: The longest wait between two attempts of one delivery.
MAX_BACKOFF_S = 300.0
_MAX_ERROR_CHARS = 1000


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``f"{timestamp}."`` followed by ``body``, keyed by ``secret``."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def payload(event: JobEvent, job: Job) -> dict[str, Any]:
    """The JSON body delivered for ``event`` of ``job``; a terminal one carries the outcome."""
    logged = JobEventOut.model_validate(event).model_dump(mode="json")
    body: dict[str, Any] = {
        "id": event.id,
        "type": "job.status",
        "job_id": str(job.id),
        "status": event.data.get("status"),
        "attempt": event.attempt,
        "event": logged,
        "created_at": logged["created_at"],
    }
    if event.type == "terminal":
        if job.error is not None:
            body["error"] = job.error
        if job.metrics is not None:
            body["metrics"] = job.metrics
    return body


@dataclass(frozen=True)
class _Claimed:
    """A delivery taken for one attempt, with everything the attempt needs."""

    delivery_id: uuid.UUID
    job_id: uuid.UUID
    event_id: int
    url: str
    body: bytes
    secret: str


@dataclass(frozen=True)
class _Outcome:
    """What one attempt got: the receiver's status code, or why there was none."""

    status_code: int | None = None
    error: str | None = None
    #: The URL no longer passes the check: retrying cannot help.
    refused: bool = False

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _lease_s(settings: Settings) -> float:
    # Long enough for resolving and posting to a few addresses, each with its own
    # timeouts; a worker that dies mid-attempt leaves the delivery due again after it.
    return 10 * settings.webhook_timeout_s + 60


def _claim(factory: sessionmaker[Session], settings: Settings, now: datetime) -> _Claimed | None:
    """Take the next due delivery for one attempt (in a short transaction of its own)."""
    with factory() as session, session.begin():
        hold_until = now + timedelta(seconds=_lease_s(settings))
        delivery = WebhookRepository(session).claim_due(now, hold_until=hold_until)
        if delivery is None:
            return None
        event = session.get_one(JobEvent, delivery.event_id)
        job = session.get_one(Job, delivery.job_id)
        secret = AuthRepository(session).webhook_secret(job.tenant_id)
        body = json.dumps(payload(event, job), separators=(",", ":")).encode()
        return _Claimed(delivery.id, job.id, event.id, delivery.url, body, secret)


def _pinned(
    target: WebhookTarget, address: IPAddress
) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The URL, extra headers and request extensions that reach ``target`` at ``address``.

    The connection goes to the checked address while ``Host`` and TLS (SNI and
    the certificate check) still name the URL's host.
    """
    url = httpx.URL(target.parts.geturl())
    try:
        ipaddress.ip_address(target.host)
    except ValueError:
        pass
    else:
        return str(url), {}, {}
    host = target.host if target.parts.port is None else f"{target.host}:{target.parts.port}"
    extensions = {"sni_hostname": target.host} if url.scheme == "https" else {}
    return str(url.copy_with(host=str(address))), {"Host": host}, extensions


def _describe(exc: Exception) -> str:
    reason = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {reason}"[:_MAX_ERROR_CHARS]


def _attempt(client: httpx.Client, claimed: _Claimed, settings: Settings) -> _Outcome:
    """POST ``claimed`` once; no transaction is open meanwhile."""
    try:
        target = resolve_webhook_url(claimed.url, allow_private=settings.webhook_allow_private)
    except Unprocessable as exc:
        # A name that stopped resolving may come back; one that now points inside never may.
        return _Outcome(error=exc.detail, refused=exc.code != "webhook_url_unresolvable")
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "Distillery-Event-Id": str(claimed.event_id),
        "Distillery-Timestamp": str(timestamp),
        "Distillery-Signature": f"v1={sign(claimed.secret, timestamp, claimed.body)}",
        "User-Agent": USER_AGENT,
        # Connections are per address, not per host: never reuse one for another URL.
        "Connection": "close",
    }
    error = "the host has no address"
    for address in target.addresses:
        url, host, extensions = _pinned(target, address)
        try:
            # Streamed and closed unread: only the status matters, whatever the body's size.
            with client.stream(
                "POST",
                url,
                content=claimed.body,
                headers={**headers, **host},
                extensions=extensions,
                timeout=settings.webhook_timeout_s,
                follow_redirects=False,
            ) as response:
                return _Outcome(status_code=response.status_code)
        except httpx.ConnectError as exc:
            # Refused or unreachable: the host's next address may answer.
            error = _describe(exc)
        except httpx.HTTPError as exc:
            return _Outcome(error=_describe(exc))
    return _Outcome(error=error)


def _origin(url: str) -> str:
    """``url`` reduced to scheme, host and port: paths and queries may hold tokens."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def backoff_s(attempts: int, settings: Settings) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: doubling, at most 300."""
    exponent = min(attempts - 1, 32)
    return float(min(settings.webhook_retry_base_s * 2**exponent, MAX_BACKOFF_S))


def _record(
    factory: sessionmaker[Session],
    claimed: _Claimed,
    outcome: _Outcome,
    settings: Settings,
    now: datetime,
) -> None:
    """Settle the delivery after an attempt and log the attempt as a ``webhook`` event."""
    with factory() as session, session.begin():
        jobs = JobRepository(session)
        jobs.lock(claimed.job_id)
        job_attempt = jobs.attempt_of(claimed.job_id)
        delivery = WebhookRepository(session).get(claimed.delivery_id)
        if job_attempt is None or delivery is None:
            # The job was deleted during the attempt, and its deliveries with it.
            return
        attempts = delivery.attempts + 1
        error = None if outcome.error is None else outcome.error[:_MAX_ERROR_CHARS]
        status, retry_at = PENDING, None
        if outcome.delivered:
            status = DELIVERED
        elif outcome.refused or attempts >= settings.webhook_max_attempts:
            status = FAILED
            log.warning(
                "webhook delivery %s of job %s failed for good after %d attempts: %s",
                delivery.id,
                claimed.job_id,
                attempts,
                outcome.error or f"HTTP {outcome.status_code}",
            )
        else:
            retry_at = now + timedelta(seconds=backoff_s(attempts, settings))
        WebhookRepository(session).record_attempt(
            delivery,
            status=status,
            status_code=outcome.status_code,
            error=error,
            at=now,
            retry_at=retry_at,
        )
        data: dict[str, Any] = {
            "event_id": claimed.event_id,
            "url": _origin(claimed.url),
            "attempt": attempts,
            "delivered": outcome.delivered,
            "next_attempt_at": None if retry_at is None else retry_at.isoformat(),
        }
        if outcome.status_code is not None:
            data["status_code"] = outcome.status_code
        else:
            data["error"] = error
        jobs.add_event(claimed.job_id, "webhook", data, attempt=job_attempt)


def deliver_due(
    factory: sessionmaker[Session],
    settings: Settings,
    *,
    now: datetime | None = None,
    limit: int = 50,
    client: httpx.Client | None = None,
) -> int:
    """Attempt up to ``limit`` due webhook deliveries; returns how many were attempted.

    For the periodic worker task; safe to run in several processes at once.
    Each delivery is taken in a short transaction, posted with no transaction
    open (``settings.webhook_timeout_s``, redirects not followed), then settled
    in another: a 2xx delivers it; anything else is retried with exponential
    backoff (``webhook_retry_base_s`` doubling, at most 300 s) until
    ``webhook_max_attempts``, then it is failed. A URL that now resolves to an
    internal address fails at once. ``now`` (default: the clock) decides what
    is due. ``client`` should not use a proxy: attempts connect to the checked
    address itself.
    """

    def clock() -> datetime:
        return now if now is not None else utcnow()

    own_client = client is None
    # No proxy from the environment: the checked address must be the one connected to.
    http = client or httpx.Client(trust_env=False, follow_redirects=False)
    attempted = 0
    try:
        while attempted < limit:
            claimed = _claim(factory, settings, clock())
            if claimed is None:
                break
            outcome = _attempt(http, claimed, settings)
            _record(factory, claimed, outcome, settings, clock())
            attempted += 1
    finally:
        if own_client:
            http.close()
    return attempted

"""Webhooks: a signed POST to a job's ``webhook_url`` on every status change (the API's half).

Deliveries are an outbox. :func:`schedule_deliveries` writes a pending row in
the transaction that logs the status change, so a delivery exists exactly when
the change committed; a worker sends the due ones (:mod:`worker.webhook_delivery`).
Receivers verify ``Distillery-Signature`` with the tenant's secret, read and
rotated here.

A URL is checked when the job is submitted and again before every attempt
(:func:`resolve_webhook_url`), and the attempt connects to an address that
passed the check, so a name that later resolves elsewhere (DNS rebinding)
cannot reach the service's own network.
"""

from __future__ import annotations

import ipaddress
import socket
import uuid
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from sqlalchemy.orm import Session

from app.auth.models import Tenant, new_webhook_secret
from app.db import utcnow
from app.errors import FieldError, Unprocessable
from app.jobs.models import Job, JobEvent
from app.webhooks.models import PENDING, WebhookDelivery
from app.webhooks.repository import WebhookRepository

#: The job events that are delivered: every status change, the last one included.
DELIVERED_EVENT_TYPES = frozenset({"status", "terminal"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
# IPv6 prefixes that carry an IPv4 address a gateway connects to.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _url_error(detail: str, *, code: str) -> Unprocessable:
    return Unprocessable(
        detail, code=code, errors=[FieldError(field="body.webhook_url", reason=detail)]
    )


def _internal(address: IPAddress) -> bool:
    """Whether ``address`` is on the service's own side: not a public unicast host."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # ::ffff:a.b.c.d reaches the IPv4 host a.b.c.d.
        address = address.ipv4_mapped
    judged: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        # 6to4 and NAT64 addresses lead to the IPv4 address they embed.
        if address.sixtofour is not None:
            judged.append(address.sixtofour)
        if address in _NAT64:
            judged.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return any(
        a.is_loopback
        or a.is_private
        or a.is_link_local
        or a.is_multicast
        or a.is_reserved
        or a.is_unspecified
        or not a.is_global
        for a in judged
    )


@dataclass(frozen=True)
class WebhookTarget:
    """A webhook URL taken apart, with the addresses its host resolved to."""

    parts: SplitResult
    host: str
    addresses: list[IPAddress]


def resolve_webhook_url(url: str, *, allow_private: bool) -> WebhookTarget:
    """``url``'s host and the addresses an attempt may connect to.

    :class:`Unprocessable` (``webhook_url_invalid``, ``webhook_url_unresolvable``
    or ``webhook_url_forbidden``) when there are none; see :func:`check_webhook_url`.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in _DEFAULT_PORTS:
        raise _url_error(
            "webhook_url must be an http:// or https:// URL", code="webhook_url_invalid"
        )
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host:
        raise _url_error("webhook_url has no valid host and port", code="webhook_url_invalid")
    try:
        found = socket.getaddrinfo(
            host, port or _DEFAULT_PORTS[parts.scheme.lower()], type=socket.SOCK_STREAM
        )
    except (OSError, UnicodeError):
        raise _url_error(
            f"the host of webhook_url, {host!r}, does not resolve",
            code="webhook_url_unresolvable",
        ) from None
    addresses: list[IPAddress] = []
    for *_, sockaddr in found:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    # One internal address refuses the URL: a client may pick any of them.
    if not allow_private and any(_internal(a) for a in addresses):
        raise _url_error(
            f"the host of webhook_url, {host!r}, resolves to a loopback, private, link-local "
            "or reserved address, which webhooks may not reach",
            code="webhook_url_forbidden",
        )
    return WebhookTarget(parts, host, addresses)


def check_webhook_url(url: str | None, *, allow_private: bool) -> None:
    """Refuse a webhook URL that would reach the service's own network.

    ``None`` passes. Otherwise the URL must be http(s) and its host must resolve
    (else 422 ``webhook_url_unresolvable``) to public addresses only: any
    loopback, private, link-local (cloud metadata included), multicast,
    reserved or unspecified address, or an IPv4-mapped form of one, is a 422
    ``webhook_url_forbidden`` unless ``allow_private``.
    """
    if url is not None:
        resolve_webhook_url(url, allow_private=allow_private)


def schedule_deliveries(session: Session, job: Job, event: JobEvent) -> None:
    """Queue a delivery of ``event`` to the job's ``webhook_url``, if it has one.

    Called in the transaction that logged the event, so the delivery commits
    or rolls back with the status change.
    """
    url = job.spec.get("webhook_url")
    if not url or event.type not in DELIVERED_EVENT_TYPES:
        return
    WebhookRepository(session).add(
        WebhookDelivery(
            id=uuid.uuid4(),
            job_id=job.id,
            event_id=event.id,
            url=url,
            status=PENDING,
            attempts=0,
            next_attempt_at=utcnow(),
        )
    )


def webhook_secret(tenant: Tenant) -> str:
    """The secret that signs ``tenant``'s webhook deliveries."""
    return tenant.webhook_secret


def rotate_webhook_secret(session: Session, *, tenant: Tenant) -> str:
    """Give ``tenant`` a new webhook secret and return it; deliveries from now on use it."""
    tenant.webhook_secret = new_webhook_secret()
    session.flush()
    return tenant.webhook_secret

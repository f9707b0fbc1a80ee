"""Tables of the auth domain: tenants (with their webhook secret) and their API keys."""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, UTCDateTime


def new_webhook_secret() -> str:
    """A fresh random secret for signing a tenant's webhooks (43 URL-safe characters)."""
    return secrets.token_urlsafe(32)


class Tenant(Base):
    """An account: every resource belongs to exactly one tenant."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(200), unique=True)
    #: The key of the HMAC-SHA256 signature on the tenant's webhook deliveries.
    webhook_secret: Mapped[str] = mapped_column(String(64), default=new_webhook_secret)

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant", lazy="raise")


class ApiKey(Base):
    """A bearer key: ``key_id`` finds the row, ``secret_hash`` (sha256) proves the secret."""

    __tablename__ = "api_keys"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys", lazy="raise")

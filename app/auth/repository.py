"""Queries of the auth domain."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.models import ApiKey, Tenant


class AuthRepository:
    """Tenants and API keys in one session."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def tenant_by_name(self, name: str) -> Tenant | None:
        """The tenant called ``name``, if any."""
        return self.session.scalars(select(Tenant).where(Tenant.name == name)).one_or_none()

    def webhook_secret(self, tenant_id: uuid.UUID) -> str:
        """The secret that signs the webhook deliveries of tenant ``tenant_id``."""
        return self.session.scalars(
            select(Tenant.webhook_secret).where(Tenant.id == tenant_id)
        ).one()

    def active_key(self, key_id: str) -> tuple[ApiKey, Tenant] | None:
        """The unrevoked key ``key_id`` and its tenant, if any."""
        row = self.session.execute(
            select(ApiKey, Tenant)
            .join(Tenant, ApiKey.tenant_id == Tenant.id)
            .where(ApiKey.key_id == key_id, ApiKey.revoked_at.is_(None))
        ).one_or_none()
        return None if row is None else (row[0], row[1])

    def add(self, obj: Tenant | ApiKey) -> None:
        """Stage ``obj`` and flush, so database constraints are checked now."""
        self.session.add(obj)
        self.session.flush()

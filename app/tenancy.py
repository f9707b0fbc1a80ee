"""Rows that belong to a tenant: the column and relationship every such table shares, and
the columns of a tenant's uploaded file (teacher models, datasets)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, declared_attr, mapped_column, relationship

from app.auth.models import Tenant
from app.db import UTCDateTime, utcnow


class TenantOwned:
    """Mixed into a table class on ``app.db.Base``: the owning tenant, deleted with it.

    Every query of such a table goes through :class:`app.repository.TenantRepository`,
    which scopes it by tenant.
    """

    id: Mapped[uuid.UUID]
    created_at: Mapped[datetime]
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )

    @declared_attr
    def tenant(cls) -> Mapped[Tenant]:
        """The owning tenant; never loaded implicitly (``lazy="raise"``)."""
        return relationship(Tenant, lazy="raise")


class StoredFile(TenantOwned):
    """Columns of a tenant's uploaded file; mixed into a table class on ``app.db.Base``.

    ``status`` is ``ready``, ``processing`` or ``invalid`` (with ``error``).
    """

    name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))
    format: Mapped[str | None] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(512))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

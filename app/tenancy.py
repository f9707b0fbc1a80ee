"""Rows that belong to a tenant: the column and relationship every such table shares."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey
from sqlalchemy.orm import Mapped, declared_attr, mapped_column, relationship

from app.auth.models import Tenant


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

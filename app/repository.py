"""Queries shared by the tenant-owned tables: every one is scoped by tenant."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import ClassVar, Generic, TypeVar

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session

from app.pagination import Cursor
from app.tenancy import TenantOwned

RowT = TypeVar("RowT", bound=TenantOwned)


class TenantRepository(Generic[RowT]):
    """Rows of ``row_type`` in one session, each query limited to one tenant."""

    row_type: ClassVar[type[TenantOwned]]

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, tenant_id: uuid.UUID, row_id: uuid.UUID) -> RowT | None:
        """The tenant's row ``row_id``, if it exists."""
        row = self.row_type
        found = self.session.scalars(
            select(row).where(row.id == row_id, row.tenant_id == tenant_id)
        ).one_or_none()
        return found  # type: ignore[return-value]

    def lookup(self, tenant_id: uuid.UUID, row_id: str) -> RowT | None:
        """The tenant's row whose id is the text ``row_id``; a malformed id finds nothing."""
        try:
            ident = uuid.UUID(row_id)
        except ValueError:
            return None
        return self.get(tenant_id, ident)

    def page(
        self,
        tenant_id: uuid.UUID,
        *,
        limit: int,
        after: Cursor | None,
        where: Sequence[ColumnElement[bool]] = (),
    ) -> Sequence[RowT]:
        """Up to ``limit`` of the tenant's rows after ``after`` matching ``where``, newest first."""
        row = self.row_type
        query = select(row).where(row.tenant_id == tenant_id, *where)
        if after is not None:
            query = query.where(
                or_(
                    row.created_at < after.created_at,
                    and_(row.created_at == after.created_at, row.id < after.id),
                )
            )
        query = query.order_by(row.created_at.desc(), row.id.desc())
        return self.session.scalars(query.limit(limit)).all()  # type: ignore[return-value]

    def add(self, item: RowT) -> None:
        """Stage ``item`` and flush, so constraints are checked before its file is kept."""
        self.session.add(item)
        self.session.flush()

    def delete(self, item: RowT) -> None:
        """Delete ``item``'s row (flushed)."""
        self.session.delete(item)
        self.session.flush()

"""Queries shared by the tenant-owned tables: every one is scoped by tenant.

:class:`TenantRepository` holds the lookups and the paging every table of a
tenant's rows needs; :class:`StoredFileRepository` adds what the tables of
uploaded files (models, datasets) share.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import ClassVar, Generic, TypeVar

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.pagination import Cursor
from app.tenancy import StoredFile, TenantOwned

RowT = TypeVar("RowT", bound=TenantOwned)
FileRowT = TypeVar("FileRowT", bound=StoredFile)


class TenantRepository(Generic[RowT]):
    """Rows of ``row_type`` in one session, each query limited to one tenant."""

    row_type: ClassVar[type[TenantOwned]]
    #: What a row is called in errors: ``{what}_not_found``.
    what: ClassVar[str]

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

    def get_owned(self, tenant_id: uuid.UUID, row_id: str) -> RowT:
        """The tenant's row ``row_id``; :class:`NotFound` (``{what}_not_found``) otherwise.

        Malformed ids are not found either, so ids reveal nothing about other tenants.
        """
        row = self.lookup(tenant_id, row_id)
        if row is None:
            raise NotFound(f"no {self.what} {row_id!r}", code=f"{self.what}_not_found")
        return row

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

    def list_page(
        self,
        tenant_id: uuid.UUID,
        *,
        limit: int,
        after: Cursor | None,
        where: Sequence[ColumnElement[bool]] = (),
    ) -> tuple[Sequence[RowT], Cursor | None]:
        """A page of the tenant's rows (matching ``where``), newest first, and the cursor of
        the next page (``None`` on the last)."""
        rows = self.page(tenant_id, limit=limit + 1, after=after, where=where)
        if len(rows) <= limit:
            return rows, None
        rows = rows[:limit]
        return rows, Cursor(rows[-1].created_at, rows[-1].id)

    def add(self, item: RowT) -> None:
        """Stage ``item`` and flush, so constraints are checked before its file is kept."""
        self.session.add(item)
        self.session.flush()

    def delete(self, item: RowT) -> None:
        """Delete ``item``'s row (flushed)."""
        self.session.delete(item)
        self.session.flush()


class StoredFileRepository(TenantRepository[FileRowT]):
    """Rows of an uploaded-file table (models, datasets)."""

    def processing_unchanged_since(self, changed_before: datetime) -> Sequence[FileRowT]:
        """Rows of every tenant still ``processing`` and unchanged since ``changed_before``
        (for the reconciler, which resends their inspection)."""
        row = self.row_type
        assert issubclass(row, StoredFile)
        found = self.session.scalars(
            select(row).where(row.status == "processing", row.updated_at < changed_before)
        ).all()
        return found  # type: ignore[return-value]

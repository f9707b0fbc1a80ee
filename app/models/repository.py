"""Queries of teacher models; every one is scoped by tenant."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from app.models.models import TeacherModel
from app.pagination import Cursor


class ModelRepository:
    """Teacher models of one session."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, tenant_id: uuid.UUID, model_id: uuid.UUID) -> TeacherModel | None:
        """The tenant's model ``model_id``, if it exists."""
        return self.session.scalars(
            select(TeacherModel).where(
                TeacherModel.id == model_id, TeacherModel.tenant_id == tenant_id
            )
        ).one_or_none()

    def page(
        self, tenant_id: uuid.UUID, *, limit: int, after: Cursor | None
    ) -> Sequence[TeacherModel]:
        """Up to ``limit`` of the tenant's models after ``after``, newest first."""
        query = select(TeacherModel).where(TeacherModel.tenant_id == tenant_id)
        if after is not None:
            query = query.where(
                or_(
                    TeacherModel.created_at < after.created_at,
                    and_(TeacherModel.created_at == after.created_at, TeacherModel.id < after.id),
                )
            )
        query = query.order_by(TeacherModel.created_at.desc(), TeacherModel.id.desc())
        return self.session.scalars(query.limit(limit)).all()

    def add(self, model: TeacherModel) -> None:
        """Stage ``model`` and flush, so constraints are checked before its file is kept."""
        self.session.add(model)
        self.session.flush()

    def delete(self, model: TeacherModel) -> None:
        """Delete ``model``'s row (flushed)."""
        self.session.delete(model)
        self.session.flush()

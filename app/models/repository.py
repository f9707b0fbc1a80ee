"""Queries of teacher models; every one is scoped by tenant."""

from __future__ import annotations

from app.models.models import TeacherModel
from app.repository import TenantRepository


class ModelRepository(TenantRepository[TeacherModel]):
    """Teacher models of one session."""

    row_type = TeacherModel

"""Queries of teacher models; every one is scoped by tenant."""

from __future__ import annotations

from app.models.models import TeacherModel
from app.repository import StoredFileRepository


class ModelRepository(StoredFileRepository[TeacherModel]):
    """Teacher models of one session."""

    row_type = TeacherModel
    what = "model"

"""Queries of datasets; every one is scoped by tenant."""

from __future__ import annotations

from app.datasets.models import Dataset
from app.repository import StoredFileRepository


class DatasetRepository(StoredFileRepository[Dataset]):
    """Datasets of one session."""

    row_type = Dataset
    what = "dataset"

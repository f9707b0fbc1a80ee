"""The ``datasets`` table: uploaded transfer sets and their inspected summaries."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base
from app.tenancy import StoredFile


class Dataset(StoredFile, Base):
    """A transfer-set upload; ``status`` ``ready`` (summary set), ``processing`` or ``invalid``."""

    __tablename__ = "datasets"

    rows: Mapped[int | None] = mapped_column(BigInteger)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)

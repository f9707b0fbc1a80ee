"""The ``models`` table: uploaded teacher files and their inspected signatures."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base
from app.tenancy import StoredFile


class TeacherModel(StoredFile, Base):
    """A teacher upload; ``status`` is ``ready`` (signature set), ``processing`` or ``invalid``."""

    __tablename__ = "models"

    signature: Mapped[dict[str, Any] | None] = mapped_column(JSON)

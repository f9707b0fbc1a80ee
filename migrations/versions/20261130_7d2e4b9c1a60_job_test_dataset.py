"""Jobs reference the dataset they report on instead of a test split.

Revision ID: 7d2e4b9c1a60
Revises: 3c1d9a7e5b20
Create Date: 2026-11-30 15:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7d2e4b9c1a60"
down_revision: str | None = "3c1d9a7e5b20"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("test_dataset_id", sa.Uuid(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_jobs_test_dataset_id"), ["test_dataset_id"], unique=False
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_jobs_test_dataset_id_datasets"),
            "datasets",
            ["test_dataset_id"],
            ["id"],
            ondelete="SET NULL",
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_jobs_test_dataset_id_datasets"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_jobs_test_dataset_id"))
        batch_op.drop_column("test_dataset_id")

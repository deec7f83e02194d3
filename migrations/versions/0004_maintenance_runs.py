"""maintenance runs: the last run of each beat-driven task, for health checks

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import stock_sync.adapters.models

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "maintenance_runs",
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column(
            "started_at", stock_sync.adapters.models.UtcDateTime(timezone=True), nullable=False
        ),
        sa.Column(
            "finished_at", stock_sync.adapters.models.UtcDateTime(timezone=True), nullable=False
        ),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("task", name=op.f("pk_maintenance_runs")),
    )


def downgrade() -> None:
    op.drop_table("maintenance_runs")

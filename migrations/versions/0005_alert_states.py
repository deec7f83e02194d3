"""alert states: each rule's firing state and the notice owed to the webhook, shared by every
beat host

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import stock_sync.adapters.models

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "alert_states",
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.Column("firing", sa.Boolean(), nullable=False),
        sa.Column(
            "firing_since", stock_sync.adapters.models.UtcDateTime(timezone=True), nullable=False
        ),
        sa.Column(
            "resolved_at", stock_sync.adapters.models.UtcDateTime(timezone=True), nullable=True
        ),
        sa.Column("last_value", sa.Float(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.Column(
            "last_evaluated_at",
            stock_sync.adapters.models.UtcDateTime(timezone=True),
            nullable=False,
        ),
        sa.Column(
            "last_notified_at", stock_sync.adapters.models.UtcDateTime(timezone=True), nullable=True
        ),
        sa.Column("pending_notice", sa.JSON(), nullable=True),
        sa.Column("delivery_attempts", sa.Integer(), nullable=False),
        sa.Column(
            "delivering_until", stock_sync.adapters.models.UtcDateTime(timezone=True), nullable=True
        ),
        sa.PrimaryKeyConstraint("rule", name=op.f("pk_alert_states")),
    )


def downgrade() -> None:
    op.drop_table("alert_states")

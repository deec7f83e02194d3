"""agreement under faults: one deduction per order, deduct_stock's own budget, sync PUT marker

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import stock_sync.adapters.models

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ORDER_DEDUCTION = sa.text("operation_type = 'order_deduction'")


def _refuse_duplicate_deductions() -> None:
    """The new unique index needs one deduction per order; say which orders break it."""
    duplicates = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT order_id FROM pending_stock_operations"
                " WHERE operation_type = 'order_deduction'"
                " GROUP BY order_id HAVING count(*) > 1 ORDER BY order_id LIMIT 10"
            )
        )
        .scalars()
        .all()
    )
    if duplicates:
        raise RuntimeError(
            "cannot migrate: these orders have more than one order deduction (resolve them by "
            "hand, e.g. cancel the extra one and delete it): " + ", ".join(duplicates)
        )


def upgrade() -> None:
    _refuse_duplicate_deductions()
    with op.batch_alter_table("pending_stock_operations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("deduction_retry_count", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column(
                "sync_put_sent_at",
                stock_sync.adapters.models.UtcDateTime(timezone=True),
                nullable=True,
            )
        )
        batch_op.drop_index(
            "uq_order_deduction_account_order",
            postgresql_where=ORDER_DEDUCTION,
            sqlite_where=ORDER_DEDUCTION,
        )
        batch_op.drop_index(
            "uq_order_deduction_order_without_account",
            postgresql_where=sa.text("operation_type = 'order_deduction' AND account_name IS NULL"),
            sqlite_where=sa.text("operation_type = 'order_deduction' AND account_name IS NULL"),
        )
        batch_op.create_index(
            "uq_order_deduction_order",
            ["order_id"],
            unique=True,
            postgresql_where=ORDER_DEDUCTION,
            sqlite_where=ORDER_DEDUCTION,
        )
    # Before this revision the sync recorded the status before its first PUT, so a row with
    # that status may have sent one.
    op.execute(
        "UPDATE pending_stock_operations SET sync_put_sent_at = updated_at"
        " WHERE fulfillment_status_before_sync IS NOT NULL"
        " AND operation_type = 'order_deduction'"
    )


def downgrade() -> None:
    with op.batch_alter_table("pending_stock_operations", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_order_deduction_order",
            postgresql_where=ORDER_DEDUCTION,
            sqlite_where=ORDER_DEDUCTION,
        )
        batch_op.create_index(
            "uq_order_deduction_order_without_account",
            ["order_id"],
            unique=True,
            postgresql_where=sa.text("operation_type = 'order_deduction' AND account_name IS NULL"),
            sqlite_where=sa.text("operation_type = 'order_deduction' AND account_name IS NULL"),
        )
        batch_op.create_index(
            "uq_order_deduction_account_order",
            ["account_name", "order_id"],
            unique=True,
            postgresql_where=ORDER_DEDUCTION,
            sqlite_where=ORDER_DEDUCTION,
        )
        batch_op.drop_column("sync_put_sent_at")
        batch_op.drop_column("deduction_retry_count")

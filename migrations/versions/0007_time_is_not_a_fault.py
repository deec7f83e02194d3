"""time is not a fault: dispatch generations and stamps, queue probes, retries parked in the
row, successors of failed operations

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import stock_sync.adapters.models

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ORDER_DEDUCTION = sa.text("operation_type = 'order_deduction'")
FIRST_ORDER_DEDUCTION = sa.text(
    "operation_type = 'order_deduction' AND predecessor_operation_id IS NULL"
)
PARKED = sa.text("dispatched_at IS NULL AND next_retry_at IS NOT NULL")
LIVE = "('pending', 'processing', 'stock_deducted')"


def upgrade() -> None:
    utc = stock_sync.adapters.models.UtcDateTime(timezone=True)
    with op.batch_alter_table("pending_stock_operations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("dispatch_generation", sa.Integer(), server_default="1", nullable=False)
        )
        batch_op.add_column(sa.Column("dispatched_at", utc, nullable=True))
        batch_op.add_column(sa.Column("attempt_started_at", utc, nullable=True))
        batch_op.add_column(sa.Column("failed_stage", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("predecessor_operation_id", sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column("successor_operation_id", sa.Uuid(), nullable=True))
        batch_op.create_unique_constraint(
            batch_op.f("uq_pending_stock_operations_predecessor_operation_id"),
            ["predecessor_operation_id"],
        )
        batch_op.create_foreign_key(
            batch_op.f(
                "fk_pending_stock_operations_predecessor_operation_id_pending_stock_operations"
            ),
            "pending_stock_operations",
            ["predecessor_operation_id"],
            ["id"],
        )
        batch_op.create_foreign_key(
            batch_op.f(
                "fk_pending_stock_operations_successor_operation_id_pending_stock_operations"
            ),
            "pending_stock_operations",
            ["successor_operation_id"],
            ["id"],
        )
        batch_op.drop_index(
            "uq_order_deduction_order",
            postgresql_where=ORDER_DEDUCTION,
            sqlite_where=ORDER_DEDUCTION,
        )
        batch_op.create_index(
            "uq_order_deduction_order",
            ["order_id"],
            unique=True,
            postgresql_where=FIRST_ORDER_DEDUCTION,
            sqlite_where=FIRST_ORDER_DEDUCTION,
        )
        batch_op.create_index(
            "ix_pending_stock_operations_status_dispatched_at", ["status", "dispatched_at"]
        )
        batch_op.create_index(
            "ix_pending_stock_operations_status_attempt_started_at",
            ["status", "attempt_started_at"],
        )
        batch_op.create_index(
            "ix_pending_stock_operations_parked_next_retry_at",
            ["next_retry_at"],
            postgresql_where=PARKED,
            sqlite_where=PARKED,
        )
    # A live row of an older revision was last dispatched, at the latest, when it last changed.
    op.execute(
        f"UPDATE pending_stock_operations SET dispatched_at = updated_at WHERE status IN {LIVE}"
    )
    op.create_table(
        "queue_probes",
        sa.Column("id", stock_sync.adapters.models.BigIntegerKey, nullable=False),
        sa.Column("queue", sa.String(length=200), nullable=False),
        sa.Column("dispatched_at", utc, nullable=False),
        sa.Column("consumed_at", utc, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_queue_probes")),
    )
    op.create_index(
        "ix_queue_probes_queue_dispatched_at", "queue_probes", ["queue", "dispatched_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_queue_probes_queue_dispatched_at", table_name="queue_probes")
    op.drop_table("queue_probes")
    successors = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT count(*) FROM pending_stock_operations"
                " WHERE predecessor_operation_id IS NOT NULL"
            )
        )
        .scalar()
    )
    if successors:
        raise RuntimeError(
            f"cannot downgrade: {successors} operation(s) are retries of failed ones, and "
            "revision 0006 allows one order deduction per order"
        )
    with op.batch_alter_table("pending_stock_operations", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_pending_stock_operations_parked_next_retry_at",
            postgresql_where=PARKED,
            sqlite_where=PARKED,
        )
        batch_op.drop_index("ix_pending_stock_operations_status_attempt_started_at")
        batch_op.drop_index("ix_pending_stock_operations_status_dispatched_at")
        batch_op.drop_index(
            "uq_order_deduction_order",
            postgresql_where=FIRST_ORDER_DEDUCTION,
            sqlite_where=FIRST_ORDER_DEDUCTION,
        )
        batch_op.create_index(
            "uq_order_deduction_order",
            ["order_id"],
            unique=True,
            postgresql_where=ORDER_DEDUCTION,
            sqlite_where=ORDER_DEDUCTION,
        )
        batch_op.drop_constraint(
            batch_op.f(
                "fk_pending_stock_operations_successor_operation_id_pending_stock_operations"
            ),
            type_="foreignkey",
        )
        batch_op.drop_constraint(
            batch_op.f(
                "fk_pending_stock_operations_predecessor_operation_id_pending_stock_operations"
            ),
            type_="foreignkey",
        )
        batch_op.drop_constraint(
            batch_op.f("uq_pending_stock_operations_predecessor_operation_id"), type_="unique"
        )
        batch_op.drop_column("successor_operation_id")
        batch_op.drop_column("predecessor_operation_id")
        batch_op.drop_column("failed_stage")
        batch_op.drop_column("attempt_started_at")
        batch_op.drop_column("dispatched_at")
        batch_op.drop_column("dispatch_generation")

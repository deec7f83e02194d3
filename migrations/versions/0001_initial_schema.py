"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26 02:49:37.754877
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import stock_sync.adapters.models

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pending_stock_operations",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("order_id", sa.String(length=128), nullable=False),
        sa.Column("account_name", sa.String(length=128), nullable=True),
        sa.Column("operation_type", sa.String(length=32), nullable=False),
        sa.Column("parent_operation_id", sa.Uuid(), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("line_items", sa.JSON(), nullable=True),
        sa.Column("order_revision", sa.Integer(), nullable=True),
        sa.Column("retry_count", sa.Integer(), nullable=False),
        sa.Column(
            "next_retry_at", stock_sync.adapters.models.UtcDateTime(timezone=True), nullable=True
        ),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_type", sa.String(length=64), nullable=True),
        sa.Column(
            "created_at", stock_sync.adapters.models.UtcDateTime(timezone=True), nullable=False
        ),
        sa.Column(
            "updated_at", stock_sync.adapters.models.UtcDateTime(timezone=True), nullable=False
        ),
        sa.Column(
            "line_items_loaded_at",
            stock_sync.adapters.models.UtcDateTime(timezone=True),
            nullable=True,
        ),
        sa.Column(
            "stock_deducted_at",
            stock_sync.adapters.models.UtcDateTime(timezone=True),
            nullable=True,
        ),
        sa.Column(
            "microservice_synced_at",
            stock_sync.adapters.models.UtcDateTime(timezone=True),
            nullable=True,
        ),
        sa.Column(
            "completed_at", stock_sync.adapters.models.UtcDateTime(timezone=True), nullable=True
        ),
        sa.Column(
            "failed_at", stock_sync.adapters.models.UtcDateTime(timezone=True), nullable=True
        ),
        sa.Column(
            "cancelled_at", stock_sync.adapters.models.UtcDateTime(timezone=True), nullable=True
        ),
        sa.Column("cancelled_by", sa.String(length=128), nullable=True),
        sa.Column("cancellation_reason", sa.Text(), nullable=True),
        sa.Column("rollback_operations", sa.JSON(), nullable=True),
        sa.Column("fulfillment_status_before_sync", sa.String(length=32), nullable=True),
        sa.Column("target_fulfillment_status", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(
            ["parent_operation_id"],
            ["pending_stock_operations.id"],
            name=op.f("fk_pending_stock_operations_parent_operation_id_pending_stock_operations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pending_stock_operations")),
    )
    with op.batch_alter_table("pending_stock_operations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_pending_stock_operations_cancelled_at", ["cancelled_at"], unique=False
        )
        batch_op.create_index(
            "ix_pending_stock_operations_completed_at", ["completed_at"], unique=False
        )
        batch_op.create_index(
            "ix_pending_stock_operations_created_at", ["created_at"], unique=False
        )
        batch_op.create_index("ix_pending_stock_operations_order_id", ["order_id"], unique=False)
        batch_op.create_index(
            "ix_pending_stock_operations_parent_operation_id", ["parent_operation_id"], unique=False
        )
        batch_op.create_index(
            "ix_pending_stock_operations_status_updated_at", ["status", "updated_at"], unique=False
        )
        batch_op.create_index(
            "uq_order_deduction_account_order",
            ["account_name", "order_id"],
            unique=True,
            postgresql_where=sa.text("operation_type = 'order_deduction'"),
            sqlite_where=sa.text("operation_type = 'order_deduction'"),
        )
        batch_op.create_index(
            "uq_order_deduction_order_without_account",
            ["order_id"],
            unique=True,
            postgresql_where=sa.text("operation_type = 'order_deduction' AND account_name IS NULL"),
            sqlite_where=sa.text("operation_type = 'order_deduction' AND account_name IS NULL"),
        )

    op.create_table(
        "stock_levels",
        sa.Column("sku", sa.String(length=128), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column(
            "updated_at", stock_sync.adapters.models.UtcDateTime(timezone=True), nullable=False
        ),
        sa.CheckConstraint("quantity >= 0", name=op.f("ck_stock_levels_quantity_not_negative")),
        sa.PrimaryKeyConstraint("sku", name=op.f("pk_stock_levels")),
    )
    op.create_table(
        "operation_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("operation_id", sa.Uuid(), nullable=False),
        sa.Column("action", sa.String(length=48), nullable=False),
        sa.Column("from_status", sa.String(length=20), nullable=True),
        sa.Column("to_status", sa.String(length=20), nullable=True),
        sa.Column("error_type", sa.String(length=64), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.Column("at", stock_sync.adapters.models.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["operation_id"],
            ["pending_stock_operations.id"],
            name=op.f("fk_operation_events_operation_id_pending_stock_operations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operation_events")),
    )
    with op.batch_alter_table("operation_events", schema=None) as batch_op:
        batch_op.create_index("ix_operation_events_action_at", ["action", "at"], unique=False)
        batch_op.create_index(
            "ix_operation_events_errors_at",
            ["at", "error_type"],
            unique=False,
            postgresql_where=sa.text("error_type IS NOT NULL"),
            sqlite_where=sa.text("error_type IS NOT NULL"),
        )
        batch_op.create_index(
            "ix_operation_events_operation_id_id", ["operation_id", "id"], unique=False
        )

    op.create_table(
        "stock_movements",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("sku", sa.String(length=128), nullable=False),
        sa.Column("delta", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("operation_id", sa.Uuid(), nullable=True),
        sa.Column("line_item_id", sa.String(length=128), nullable=True),
        sa.Column(
            "reverses_movement_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=True,
        ),
        sa.Column(
            "created_at", stock_sync.adapters.models.UtcDateTime(timezone=True), nullable=False
        ),
        sa.CheckConstraint("delta <> 0", name=op.f("ck_stock_movements_delta_not_zero")),
        sa.ForeignKeyConstraint(
            ["operation_id"],
            ["pending_stock_operations.id"],
            name=op.f("fk_stock_movements_operation_id_pending_stock_operations"),
        ),
        sa.ForeignKeyConstraint(
            ["reverses_movement_id"],
            ["stock_movements.id"],
            name=op.f("fk_stock_movements_reverses_movement_id_stock_movements"),
        ),
        sa.ForeignKeyConstraint(
            ["sku"], ["stock_levels.sku"], name=op.f("fk_stock_movements_sku_stock_levels")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stock_movements")),
        sa.UniqueConstraint(
            "operation_id",
            "line_item_id",
            "reason",
            name=op.f("uq_stock_movements_operation_id_line_item_id_reason"),
        ),
        sa.UniqueConstraint(
            "reverses_movement_id", name=op.f("uq_stock_movements_reverses_movement_id")
        ),
    )
    with op.batch_alter_table("stock_movements", schema=None) as batch_op:
        batch_op.create_index("ix_stock_movements_sku", ["sku"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("stock_movements", schema=None) as batch_op:
        batch_op.drop_index("ix_stock_movements_sku")

    op.drop_table("stock_movements")
    with op.batch_alter_table("operation_events", schema=None) as batch_op:
        batch_op.drop_index("ix_operation_events_operation_id_id")
        batch_op.drop_index(
            "ix_operation_events_errors_at",
            postgresql_where=sa.text("error_type IS NOT NULL"),
            sqlite_where=sa.text("error_type IS NOT NULL"),
        )
        batch_op.drop_index("ix_operation_events_action_at")

    op.drop_table("operation_events")
    op.drop_table("stock_levels")
    with op.batch_alter_table("pending_stock_operations", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_order_deduction_order_without_account",
            postgresql_where=sa.text("operation_type = 'order_deduction' AND account_name IS NULL"),
            sqlite_where=sa.text("operation_type = 'order_deduction' AND account_name IS NULL"),
        )
        batch_op.drop_index(
            "uq_order_deduction_account_order",
            postgresql_where=sa.text("operation_type = 'order_deduction'"),
            sqlite_where=sa.text("operation_type = 'order_deduction'"),
        )
        batch_op.drop_index("ix_pending_stock_operations_status_updated_at")
        batch_op.drop_index("ix_pending_stock_operations_parent_operation_id")
        batch_op.drop_index("ix_pending_stock_operations_order_id")
        batch_op.drop_index("ix_pending_stock_operations_created_at")
        batch_op.drop_index("ix_pending_stock_operations_completed_at")
        batch_op.drop_index("ix_pending_stock_operations_cancelled_at")

    op.drop_table("pending_stock_operations")

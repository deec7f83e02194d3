"""metric counters: cumulative counts of operations created, finished per status and errors
per type, raised with the events they count, so Prometheus counters need no full-table count;
an (operation_type, status) index for the failed-rollbacks metric

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTED = """
SELECT 'operations_created', '', 0, count(*) FROM operation_events
WHERE action = 'operation_created'
UNION ALL
SELECT 'operations_finished', to_status, 0, count(*) FROM operation_events
WHERE to_status IN ('completed', 'failed', 'cancelled') GROUP BY to_status
UNION ALL
SELECT 'errors', error_type, 0, count(*) FROM operation_events
WHERE error_type IS NOT NULL GROUP BY error_type
"""


def upgrade() -> None:
    op.create_table(
        "metric_counters",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("shard", sa.SmallInteger(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", "label", "shard", name=op.f("pk_metric_counters")),
    )
    op.create_index(
        "ix_pending_stock_operations_operation_type_status",
        "pending_stock_operations",
        ["operation_type", "status"],
    )
    # The counts so far, from the audit trail the counters are kept from from now on.
    op.execute(f"INSERT INTO metric_counters (name, label, shard, value) {COUNTED}")


def downgrade() -> None:
    op.drop_index(
        "ix_pending_stock_operations_operation_type_status",
        table_name="pending_stock_operations",
    )
    op.drop_table("metric_counters")

"""the marketplace as it behaves: the sync PUTs each operation may have sent (one key per
payload), a reload ticket so the recorded revision only moves forward, rollbacks numbered in
their parent's lock order instead of by a worker's clock

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rollbacks made before this revision, numbered in the order they were created (the best this
# revision can know; from now on the number is taken under the parent's row lock).
NUMBER_ROLLBACKS = """
UPDATE pending_stock_operations SET rollback_seq = numbered.seq
FROM (
    SELECT id, row_number() OVER (PARTITION BY parent_operation_id ORDER BY created_at, id) AS seq
    FROM pending_stock_operations WHERE operation_type = 'microservice_rollback'
) AS numbered
WHERE pending_stock_operations.id = numbered.id
"""


# Rows that may have sent a sync PUT under the one key of earlier releases: a rollback claims it.
LEGACY_KEY = {
    "postgresql": "json_build_array(json_build_object('key', 'stock-sync:' || id || ':' || 'sync', "
    "'expected_revision', order_revision))",
    "sqlite": "json_array(json_object('key', 'stock-sync:' || id || ':' || 'sync', "
    "'expected_revision', order_revision))",
}


def upgrade() -> None:
    with op.batch_alter_table("pending_stock_operations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sync_puts", sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column("revision_reads", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("rollback_seq", sa.Integer(), nullable=True))
    op.execute(NUMBER_ROLLBACKS)
    legacy = LEGACY_KEY[op.get_bind().dialect.name]
    op.execute(
        f"UPDATE pending_stock_operations SET sync_puts = {legacy}"
        " WHERE sync_put_sent_at IS NOT NULL AND order_revision IS NOT NULL"
        " AND operation_type = 'order_deduction'"
    )


def downgrade() -> None:
    with op.batch_alter_table("pending_stock_operations", schema=None) as batch_op:
        batch_op.drop_column("rollback_seq")
        batch_op.drop_column("revision_reads")
        batch_op.drop_column("sync_puts")

"""opaque revision: the order revision is stored as the JSON text of what the microservice sent

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 13:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # An integer's JSON text is its decimal digits, so the cast keeps every stored revision.
    with op.batch_alter_table("pending_stock_operations", schema=None) as batch_op:
        batch_op.alter_column(
            "order_revision",
            existing_type=sa.Integer(),
            type_=sa.String(length=200),
            existing_nullable=True,
            postgresql_using="order_revision::text",
        )


def downgrade() -> None:
    # Only integer revisions survive a downgrade; a string token cannot be kept in an integer.
    op.execute(
        "UPDATE pending_stock_operations SET order_revision = NULL"
        " WHERE order_revision IS NOT NULL AND order_revision NOT SIMILAR TO '-?[0-9]+'"
        if op.get_bind().dialect.name == "postgresql"
        else "UPDATE pending_stock_operations SET order_revision = NULL"
        " WHERE order_revision IS NOT NULL AND order_revision GLOB '*[^0-9-]*'"
    )
    with op.batch_alter_table("pending_stock_operations", schema=None) as batch_op:
        batch_op.alter_column(
            "order_revision",
            existing_type=sa.String(length=200),
            type_=sa.Integer(),
            existing_nullable=True,
            postgresql_using="order_revision::integer",
        )

"""a transaction whose client vanished ends after 30 s idle instead of holding its row locks
until the server's TCP gives up (15 min to 2 h): PostgreSQL's
idle_in_transaction_session_timeout, set on the database (new sessions take it; no session SET,
which a transaction-pooling PgBouncer would leak onto other clients)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 17:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Our transactions never wait on the network (no HTTP inside a transaction): a legitimate idle
# gap is milliseconds. 30 s also ends the orphan before a stage's soft time limit (60 s).
IDLE_IN_TRANSACTION_TIMEOUT = "30s"

# Only the database's owner (or a superuser) may set it: without the privilege the migration
# goes on and says so (docs/deployment.md gives the statement for the DBA).
_SET = """
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I SET idle_in_transaction_session_timeout = {value}',
                   current_database());
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'stock-sync: not allowed to set idle_in_transaction_session_timeout on this '
                  'database; ask its owner to run: ALTER DATABASE % SET '
                  'idle_in_transaction_session_timeout = ''{timeout}''', current_database();
END $$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        _SET.format(value=f"''{IDLE_IN_TRANSACTION_TIMEOUT}''", timeout=IDLE_IN_TRANSACTION_TIMEOUT)
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(_SET.format(value="DEFAULT", timeout=IDLE_IN_TRANSACTION_TIMEOUT))

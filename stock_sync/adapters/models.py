"""SQLAlchemy 2 typed models: operations, stock levels, the stock ledger and the audit trail."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Connection,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    select,
    text,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator

from stock_sync.domain.statuses import OperationStatus, OperationType

ORDER_ID_MAX_LENGTH = 128
ACCOUNT_NAME_MAX_LENGTH = 128
SKU_MAX_LENGTH = 128
# A revision token is at most 64 characters; its JSON text adds quotes and escapes.
REVISION_MAX_LENGTH = 200

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite's INTEGER PRIMARY KEY is its autoincrementing rowid; PostgreSQL gets a BIGINT identity.
BigIntegerKey = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both databases (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given; stock-sync stores UTC-aware datetimes")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class db_now(FunctionElement[datetime]):
    """The database's clock, for every stamp that another host compares: the workers, beat and
    the producer may run on hosts whose clocks disagree, the database is the one they share.

    PostgreSQL: ``now()``, the start of the transaction. SQLite (one host, the embedded
    default): the current time in the text form SQLAlchemy stores datetimes in, so the stamps
    compare with the values it writes."""

    type = UtcDateTime()
    inherit_cache = True


@compiles(db_now)
def _db_now_postgresql(element: db_now, compiler: Any, **kw: Any) -> str:
    return "now()"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    return "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


FIRST_ORDER_DEDUCTION = "operation_type = 'order_deduction' AND predecessor_operation_id IS NULL"
PARKED = "dispatched_at IS NULL AND next_retry_at IS NOT NULL"


class _StatusAndType(Protocol):
    @property
    def status(self) -> str: ...

    @property
    def operation_type(self) -> str: ...


class OperationKinds:
    """An operation's ``status`` and ``operation_type`` read as enums: the ORM model and the
    Core row (adapters.operation_rows.OperationRow) alike."""

    @property
    def status_enum(self: _StatusAndType) -> OperationStatus:
        return OperationStatus(self.status)

    @property
    def type_enum(self: _StatusAndType) -> OperationType:
        return OperationType(self.operation_type)


class PendingStockOperation(Base, OperationKinds):
    """A stock operation: an order's deduction, or an adjustment created by a rollback."""

    __tablename__ = "pending_stock_operations"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    order_id: Mapped[str] = mapped_column(String(ORDER_ID_MAX_LENGTH))
    account_name: Mapped[str | None] = mapped_column(String(ACCOUNT_NAME_MAX_LENGTH))
    operation_type: Mapped[str] = mapped_column(
        String(32), default=OperationType.ORDER_DEDUCTION.value
    )
    parent_operation_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("pending_stock_operations.id")
    )
    status: Mapped[str] = mapped_column(String(20), default=OperationStatus.PENDING.value)
    line_items: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    # The order's revision as the microservice sent it, as JSON text (see domain.revisions).
    order_revision: Mapped[str | None] = mapped_column(String(REVISION_MAX_LENGTH))
    # Retries used by the stage of the current status; restarts when a transition moves on.
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    # deduct_stock's own budget: it shares PROCESSING with validate_stock (see RetryCounter).
    deduction_retry_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_retry_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_type: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)
    line_items_loaded_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    stock_deducted_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    microservice_synced_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    failed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    cancelled_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    cancelled_by: Mapped[str | None] = mapped_column(String(128))
    cancellation_reason: Mapped[str | None] = mapped_column(Text)
    rollback_operations: Mapped[list[str] | None] = mapped_column(JSON)
    # The fulfillment status the microservice had before our sync: what a rollback restores.
    fulfillment_status_before_sync: Mapped[str | None] = mapped_column(String(32))
    # Set by the deduction (from then on a sync PUT may leave) or, for a row deducted before
    # this column existed, under the row lock before its PUT: the marketplace may show
    # PROCESSING (an answer can be lost), so a cancellation must roll it back.
    sync_put_sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # For a microservice rollback adjustment: the fulfillment status to put back.
    target_fulfillment_status: Mapped[str | None] = mapped_column(String(32))
    # The dispatch that drives the operation now (see stock_sync.services.stuck): every message
    # our code publishes for it carries this generation, and a copy of an older one is dropped.
    dispatch_generation: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # When the message that should drive the operation now was published (database clock);
    # NULL while a long retry waits in the row for next_retry_at (no message exists then).
    dispatched_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # When the running attempt of a network stage began (database clock); NULL when none runs.
    attempt_started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # The stage whose failure moved the operation to FAILED (what `stock-sync retry --stage`
    # selects by).
    failed_stage: Mapped[str | None] = mapped_column(String(32))
    # Every sync PUT the operation may have sent, recorded before it leaves: [{"key",
    # "expected_revision"}] (one Idempotency-Key per payload). A rollback claims each of them
    # with its own body first, so a copy still in flight can only be a replay.
    sync_puts: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)
    # How many times the sync has re-read the order: the ticket of the newest read, so an
    # older read never records its revision over a newer one.
    revision_reads: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # For a microservice rollback: its number among its parent's rollbacks, taken under the
    # parent's row lock (the latest is the highest, whatever the workers' clocks say).
    rollback_seq: Mapped[int | None] = mapped_column(Integer)
    # A FAILED order deduction retried by `stock-sync retry` links to its successor, which
    # links back; the successor is the order's deduction from then on.
    predecessor_operation_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("pending_stock_operations.id"), unique=True
    )
    successor_operation_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("pending_stock_operations.id")
    )

    __table_args__ = (
        Index("ix_pending_stock_operations_status_updated_at", "status", "updated_at"),
        Index("ix_pending_stock_operations_parent_operation_id", "parent_operation_id"),
        Index("ix_pending_stock_operations_created_at", "created_at"),
        Index("ix_pending_stock_operations_completed_at", "completed_at"),
        Index("ix_pending_stock_operations_cancelled_at", "cancelled_at"),
        # One submitted order deduction per order, whatever account the producer named (a
        # NULL account in a composite unique key would let two racing submits both insert);
        # a retry's successor is unique per predecessor instead, so an order's deductions form
        # one line: the submitted one, then each retry of the last.
        Index(
            "uq_order_deduction_order",
            "order_id",
            unique=True,
            postgresql_where=text(FIRST_ORDER_DEDUCTION),
            sqlite_where=text(FIRST_ORDER_DEDUCTION),
        ),
        # The sweep's two questions, answered from the live rows only: whose message was
        # published long ago and never started, whose attempt started long ago.
        Index("ix_pending_stock_operations_status_dispatched_at", "status", "dispatched_at"),
        Index(
            "ix_pending_stock_operations_status_attempt_started_at",
            "status",
            "attempt_started_at",
        ),
        # Retries waiting in the row (no message) until next_retry_at.
        Index(
            "ix_pending_stock_operations_parked_next_retry_at",
            "next_retry_at",
            postgresql_where=text(PARKED),
            sqlite_where=text(PARKED),
        ),
        Index("ix_pending_stock_operations_order_id", "order_id"),
        # Failed rollbacks (a metric and an alert): without it the query visits every
        # failed order deduction (about 120 ms over 1,000,000 finished operations).
        Index(
            "ix_pending_stock_operations_operation_type_status",
            "operation_type",
            "status",
        ),
    )


class StockLevel(Base):
    """How many units of a SKU the warehouse holds; never negative."""

    __tablename__ = "stock_levels"

    sku: Mapped[str] = mapped_column(String(SKU_MAX_LENGTH), primary_key=True)
    quantity: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)

    __table_args__ = (CheckConstraint("quantity >= 0", name="quantity_not_negative"),)


class StockMovement(Base):
    """One change of a stock level. Append-only: the level always equals the sum of these."""

    __tablename__ = "stock_movements"

    id: Mapped[int] = mapped_column(BigIntegerKey, primary_key=True, autoincrement=True)
    sku: Mapped[str] = mapped_column(String(SKU_MAX_LENGTH), ForeignKey("stock_levels.sku"))
    delta: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(32))
    operation_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("pending_stock_operations.id")
    )
    line_item_id: Mapped[str | None] = mapped_column(String(128))
    # A restoration names the deduction it negates; each deduction is negated at most once.
    reverses_movement_id: Mapped[int | None] = mapped_column(
        BigIntegerKey, ForeignKey("stock_movements.id"), unique=True
    )
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("operation_id", "line_item_id", "reason"),
        Index("ix_stock_movements_sku", "sku"),
        CheckConstraint("delta <> 0", name="delta_not_zero"),
    )


class OperationEvent(Base):
    """The audit trail: one row per LogAction that matters, written with the change it records."""

    __tablename__ = "operation_events"

    id: Mapped[int] = mapped_column(BigIntegerKey, primary_key=True, autoincrement=True)
    operation_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("pending_stock_operations.id"))
    action: Mapped[str] = mapped_column(String(48))
    from_status: Mapped[str | None] = mapped_column(String(20))
    to_status: Mapped[str | None] = mapped_column(String(20))
    error_type: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    __table_args__ = (
        Index("ix_operation_events_operation_id_id", "operation_id", "id"),
        Index("ix_operation_events_action_at", "action", "at"),
        # Error metrics read only the error events of a recent window.
        Index(
            "ix_operation_events_errors_at",
            "at",
            "error_type",
            postgresql_where=text("error_type IS NOT NULL"),
            sqlite_where=text("error_type IS NOT NULL"),
        ),
    )


class MaintenanceRun(Base):
    """The last run of each beat-driven maintenance task (sweep, alerts, reconciliation): how
    health checks tell that beat is alive, the same answer on every host."""

    __tablename__ = "maintenance_runs"

    task: Mapped[str] = mapped_column(String(64), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime] = mapped_column(UtcDateTime)
    ok: Mapped[bool] = mapped_column(Boolean)
    host: Mapped[str] = mapped_column(String(255))
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class AlertState(Base):
    """One alert rule's state, shared by every beat host: whether it fires and since when,
    what it last showed, and the notice still owed to the webhook (retried until delivered).

    A row appears the first time its rule fires and is kept (resolved) afterwards."""

    __tablename__ = "alert_states"

    rule: Mapped[str] = mapped_column(String(64), primary_key=True)
    firing: Mapped[bool] = mapped_column(Boolean)
    firing_since: Mapped[datetime] = mapped_column(UtcDateTime)
    resolved_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_value: Mapped[float | None] = mapped_column(Float)
    # The alert as last seen firing: value, threshold, window_s, sample ids, message.
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    last_evaluated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # When the last notice was delivered (accepted by the webhook, or logged without one):
    # the repeat interval counts from here.
    last_notified_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # The notice owed to the webhook, exactly as it is POSTed; NULL once delivered.
    pending_notice: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    delivery_attempts: Mapped[int] = mapped_column(Integer, default=0)
    # A host that claimed the owed notice delivers it until then; after that another may.
    delivering_until: Mapped[datetime | None] = mapped_column(UtcDateTime)


class QueueProbe(Base):
    """A probe sent through the pipeline queue behind whatever waits in it: once a worker has
    run it, every message published before ``dispatched_at`` has been taken from the queue
    (it is FIFO), so an operation dispatched before that and never started was lost, not
    queued (see stock_sync.services.stuck)."""

    __tablename__ = "queue_probes"

    id: Mapped[int] = mapped_column(BigIntegerKey, primary_key=True, autoincrement=True)
    queue: Mapped[str] = mapped_column(String(200))
    dispatched_at: Mapped[datetime] = mapped_column(UtcDateTime)
    consumed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)

    __table_args__ = (Index("ix_queue_probes_queue_dispatched_at", "queue", "dispatched_at"),)


COUNTER_SHARDS = 16


class MetricCounter(Base):
    """A cumulative count of audit events (operations created, reaching each final status,
    errors by type), raised in the transaction that writes the events: the metrics read a few
    rows instead of counting a table that only grows.

    ``label`` is the status or error type, "" for a count without one. Each worker process
    raises its own ``shard`` (its pid modulo COUNTER_SHARDS), so the transactions that finish
    operations on different processes do not queue on one counter row; readers sum the shards."""

    __tablename__ = "metric_counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[str] = mapped_column(String(64), primary_key=True)
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True, default=0)
    value: Mapped[int] = mapped_column(BigInteger)


# The tables themselves, for Core statements on the hot path (no ORM unit of work).
OPERATIONS_TABLE = cast(Table, PendingStockOperation.__table__)
STOCK_LEVELS_TABLE = cast(Table, StockLevel.__table__)
STOCK_MOVEMENTS_TABLE = cast(Table, StockMovement.__table__)
OPERATION_EVENTS_TABLE = cast(Table, OperationEvent.__table__)
METRIC_COUNTERS_TABLE = cast(Table, MetricCounter.__table__)
QUEUE_PROBES_TABLE = cast(Table, QueueProbe.__table__)


def read_database_now(connection: Connection) -> datetime:
    """The database's clock now (see :class:`db_now`), read in ``connection``'s transaction."""
    if connection.dialect.name != "postgresql":
        return utcnow()
    now: datetime = connection.execute(select(db_now())).scalar_one()
    return now

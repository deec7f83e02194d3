"""The hot path's view of an operation row: Core statements, no ORM unit of work.

Every stage of every operation locks its row, reads a few columns and writes a few: through
the ORM that was half of a worker's CPU (identity map, dirty tracking, flush). Here a stage
locks the row with one ``SELECT ... FOR UPDATE`` of the columns it needs and writes exactly
the columns it changes. Status changes still go through the one transition table.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Connection, Update, bindparam, func, select, update

from stock_sync.adapters.models import OPERATIONS_TABLE, OperationKinds, db_now, utcnow
from stock_sync.domain.errors import OperationNotFound
from stock_sync.domain.settlement import transition_details
from stock_sync.domain.statuses import (
    FINAL_STATUSES,
    OperationStatus,
    ensure_transition,
)

S = OperationStatus


class TransitionLog(Protocol):
    """Where a move is announced (the services pass their StandardizedLogger)."""

    def log_status_transition(
        self,
        operation_id: uuid.UUID,
        from_status: OperationStatus,
        to_status: OperationStatus,
        reason: str,
        additional_context: dict[str, Any] | None = None,
    ) -> None: ...


_columns = OPERATIONS_TABLE.c

# The stamp a status sets when an operation enters it (kept if already set).
STAMP_COLUMNS = {
    S.PROCESSING: "line_items_loaded_at",
    S.STOCK_DEDUCTED: "stock_deducted_at",
    S.COMPLETED: "completed_at",
    S.FAILED: "failed_at",
    S.CANCELLED: "cancelled_at",
}

_LOCKED_COLUMNS = (
    _columns.id,
    _columns.status,
    _columns.order_id,
    _columns.account_name,
    _columns.operation_type,
    _columns.created_at,  # a completion's processing time goes into its transition event
    _columns.retry_count,
    _columns.deduction_retry_count,
    _columns.line_items,
    _columns.order_revision,
    _columns.fulfillment_status_before_sync,
    _columns.sync_put_sent_at,
    _columns.dispatch_generation,
    _columns.sync_puts,
    _columns.revision_reads,
)


class _DatabaseNow:
    """A value that writes the database's clock (:func:`db_now`) into its column."""

    def __repr__(self) -> str:
        return "DATABASE_NOW"


DATABASE_NOW: Any = _DatabaseNow()


@dataclass
class OperationRow(OperationKinds):
    """The columns a stage reads, as locked; attribute names match the ORM model's."""

    id: uuid.UUID
    status: str
    order_id: str
    account_name: str | None
    operation_type: str
    created_at: datetime
    retry_count: int
    deduction_retry_count: int
    line_items: list[dict[str, Any]] | None
    order_revision: str | None
    fulfillment_status_before_sync: str | None
    sync_put_sent_at: datetime | None
    dispatch_generation: int
    sync_puts: list[dict[str, str]] | None
    revision_reads: int


def lock_row(connection: Connection, operation_id: uuid.UUID) -> OperationRow:
    """The operation's row, locked until the transaction ends (operation rows before stock
    rows: the lock order of :mod:`stock_sync.services.operations`)."""
    return _read_row(connection, operation_id, lock=True)


def peek_row(connection: Connection, operation_id: uuid.UUID) -> OperationRow:
    """The operation's row as committed now, without a lock: for deciding whether a stage
    applies; whatever acts on it re-checks the status under the row lock."""
    return _read_row(connection, operation_id, lock=False)


# Built once: SQLAlchemy then only looks up the compiled form (a fresh statement per call cost
# about 90 us of CPU each, measured).
_READ_ROW = select(*_LOCKED_COLUMNS).where(_columns.id == bindparam("operation_id"))
_LOCK_ROW = _READ_ROW.with_for_update()


def _read_row(connection: Connection, operation_id: uuid.UUID, *, lock: bool) -> OperationRow:
    statement = _LOCK_ROW if lock else _READ_ROW
    found = connection.execute(statement, {"operation_id": operation_id}).first()
    if found is None:
        raise OperationNotFound(operation_id)
    return OperationRow(**found._mapping)


@functools.lru_cache(maxsize=64)
def _update_statement(
    columns: tuple[str, ...], now_columns: tuple[str, ...], stamp: str | None, guarded: bool
) -> Update:
    """``UPDATE ... SET <columns> [, <now_columns> = now()] [, stamp = coalesce(stamp, :now)]
    WHERE id = :row_id [AND status = :read_status]``, built once per shape."""
    # parameters named after their column are reserved by SQLAlchemy in a SET clause
    values: dict[str, Any] = {name: bindparam(f"set_{name}") for name in columns}
    values.update({name: db_now() for name in now_columns})
    if stamp is not None:
        values[stamp] = func.coalesce(_columns[stamp], bindparam("set_updated_at"))
    condition = _columns.id == bindparam("row_id")
    if guarded:
        condition = condition & (_columns.status == bindparam("read_status"))
    return update(OPERATIONS_TABLE).where(condition).values(values)


def _write(
    connection: Connection,
    row_id: uuid.UUID,
    values: dict[str, Any],
    *,
    stamp: str | None = None,
    read_status: str | None = None,
) -> int:
    """Run the UPDATE of ``values`` (plus the stamp, plus the status guard); rows changed.
    A value of :data:`DATABASE_NOW` writes the database's clock."""
    bound = tuple(sorted(name for name, value in values.items() if value is not DATABASE_NOW))
    now_columns = tuple(sorted(name for name, value in values.items() if value is DATABASE_NOW))
    statement = _update_statement(bound, now_columns, stamp, read_status is not None)
    parameters = {f"set_{name}": values[name] for name in bound}
    parameters["row_id"] = row_id
    if read_status is not None:
        parameters["read_status"] = read_status
    result = connection.execute(statement, parameters)
    return int(result.rowcount)


def change_row(
    connection: Connection, row: OperationRow, *, stamp: str | None = None, **values: Any
) -> None:
    """Write ``values`` (column names) to the locked row, and the row object with them;
    ``stamp`` names a timestamp column set to ``updated_at`` unless it is set already."""
    values.setdefault("updated_at", utcnow())
    _write(connection, row.id, values, stamp=stamp)
    for name, value in values.items():
        if hasattr(row, name) and value is not DATABASE_NOW:
            setattr(row, name, value)


def move_row(
    connection: Connection,
    row: OperationRow,
    to_status: OperationStatus,
    reason: str,
    log: TransitionLog,
    **values: Any,
) -> None:
    """Move the locked row to ``to_status`` if the table allows it, with ``values`` in the same
    UPDATE; stamp it, log it. As :func:`stock_sync.services.operations.transition`: a new stage
    starts with a fresh retry budget, a final status keeps the count of the stage that ended
    there."""
    from_status = row.status_enum
    ensure_transition(from_status, to_status, row.type_enum)
    moved = _moved(to_status, values)
    change_row(connection, row, stamp=STAMP_COLUMNS.get(to_status), **moved)
    log.log_status_transition(row.id, from_status, to_status, reason, _details(row, moved))


def _moved(to_status: OperationStatus, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` plus what every move to ``to_status`` writes: the attempt has ended, and a
    live status's next stage is published right after this commit (the chain's next link)."""
    values.update(
        status=to_status.value, next_retry_at=None, updated_at=utcnow(), attempt_started_at=None
    )
    if to_status not in FINAL_STATUSES:
        values["retry_count"] = 0
        values["dispatched_at"] = DATABASE_NOW
    return values


def move_row_if_still(
    connection: Connection,
    row: OperationRow,
    to_status: OperationStatus,
    reason: str,
    log: TransitionLog,
    *,
    log_outcome: Callable[[], None] = lambda: None,
    **values: Any,
) -> bool:
    """Move the operation from ``row.status`` (as read without a lock) to ``to_status`` with
    one guarded ``UPDATE ... WHERE status = :read``, which takes the row lock; False, and
    nothing changed or logged, when the status moved meanwhile (a cancel won the race).

    ``log_outcome`` logs what the stage did, once the move is certain and before the
    transition itself, so the timeline reads in order.
    """
    from_status = row.status_enum
    ensure_transition(from_status, to_status, row.type_enum)
    written = _moved(to_status, values)
    moved = _write(
        connection,
        row.id,
        written,
        stamp=STAMP_COLUMNS.get(to_status),
        read_status=from_status.value,
    )
    if moved != 1:
        return False
    log_outcome()
    log.log_status_transition(row.id, from_status, to_status, reason, _details(row, written))
    return True


def _details(row: OperationRow, written: dict[str, Any]) -> dict[str, Any]:
    """The transition event's details: the operation type (what the settled counters count
    by) and a completion's processing time, up to the ``updated_at`` its stamp takes."""
    return transition_details(
        row.operation_type,
        OperationStatus(written["status"]),
        created_at=row.created_at,
        now=written["updated_at"],
    )


# A stage's first statement: it checks the row still waits for this stage and this dispatch,
# stamps it (the database's clock), locks it, and returns it (see services.stuck).
@functools.lru_cache(maxsize=8)
def _stamping_statement(column: str, dispatched: bool) -> Update:
    statement = (
        update(OPERATIONS_TABLE)
        .where(_columns.id == bindparam("row_id"), _columns.status == bindparam("stage_status"))
        .values({column: db_now()})
        .returning(*_LOCKED_COLUMNS)
    )
    if dispatched:
        statement = statement.where(_columns.dispatch_generation == bindparam("generation"))
    return statement


def _stamp_if_waiting(
    connection: Connection,
    operation_id: uuid.UUID,
    status: OperationStatus,
    generation: int | None,
    column: str,
) -> OperationRow | None:
    parameters: dict[str, Any] = {"row_id": operation_id, "stage_status": status.value}
    if generation is not None:
        parameters["generation"] = generation
    statement = _stamping_statement(column, generation is not None)
    found = connection.execute(statement, parameters).first()
    return None if found is None else OperationRow(**found._mapping)


def start_attempt(
    connection: Connection, operation_id: uuid.UUID, status: OperationStatus, generation: int | None
) -> OperationRow | None:
    """Stamp the start of an attempt on the row when it is in ``status`` and (for a message
    that carries one) at dispatch ``generation``; the row as stamped, or None when it is not
    (the caller reads it again to tell why)."""
    return _stamp_if_waiting(connection, operation_id, status, generation, "attempt_started_at")


def lock_for_next_link(
    connection: Connection, operation_id: uuid.UUID, status: OperationStatus, generation: int | None
) -> OperationRow | None:
    """Lock the row when it is in ``status`` at dispatch ``generation``, stamping now as its
    dispatch: the chain's next link is published once this transaction commits (and nothing
    is stamped when it rolls back). None, and nothing locked, when it is not."""
    return _stamp_if_waiting(connection, operation_id, status, generation, "dispatched_at")

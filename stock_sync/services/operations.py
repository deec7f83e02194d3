"""Loading, locking and moving operation rows: every status change goes through here."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from stock_sync.adapters.db import TransactionOwner
from stock_sync.adapters.models import PendingStockOperation, db_now, utcnow
from stock_sync.adapters.operation_events import SqlEventStore
from stock_sync.adapters.operation_rows import STAMP_COLUMNS
from stock_sync.domain.errors import OperationNotFound
from stock_sync.domain.settlement import transition_details
from stock_sync.domain.stages import Stage
from stock_sync.domain.statuses import (
    FINAL_STATUSES,
    OperationStatus,
    OperationType,
    ensure_transition,
)
from stock_sync.domain.stock import LineItem
from stock_sync.services.standardized_logger import StandardizedLogger

S = OperationStatus

# The dispatch generation of a new operation's first message (see services.stuck).
FIRST_DISPATCH = 1


def load_operation(
    session: Session, operation_id: uuid.UUID, *, for_update: bool = False
) -> PendingStockOperation:
    """The operation row; with ``for_update`` it stays locked until the transaction ends.

    Lock order of the codebase: operation rows first, then stock rows in SKU order.
    """
    statement = select(PendingStockOperation).where(PendingStockOperation.id == operation_id)
    if for_update:
        statement = statement.with_for_update()
    operation = session.scalar(statement)
    if operation is None:
        raise OperationNotFound(operation_id)
    return operation


def lock_operation(session: Session, operation_id: uuid.UUID) -> PendingStockOperation:
    """Lock the operation row for this transaction; for an adjustment, its parent first.

    The one lock order of the codebase: a parent operation before its adjustments, operation
    rows before stock rows, stock rows by :func:`stock_sync.domain.stock.stock_lock_key`.
    An adjustment's failure writes events of its parent, which takes a key-share lock on it.
    """
    parent_id = session.scalar(
        select(PendingStockOperation.parent_operation_id).where(
            PendingStockOperation.id == operation_id
        )
    )
    if parent_id is not None:
        load_operation(session, parent_id, for_update=True)
    return load_operation(session, operation_id, for_update=True)


def retries_used(operation: PendingStockOperation, stage: Stage) -> int:
    """How many retries ``stage`` has used on this operation (its own counter)."""
    return int(getattr(operation, stage.retry_counter.value) or 0)


def set_retries_used(operation: PendingStockOperation, stage: Stage, used: int) -> None:
    setattr(operation, stage.retry_counter.value, used)


class OperationLike(Protocol):
    """What logging and line items need of an operation: the ORM row or an OperationRow."""

    id: uuid.UUID
    order_id: str
    status: str
    retry_count: int
    operation_type: str
    line_items: list[dict[str, Any]] | None


def operation_logger(
    session: TransactionOwner | None, operation: OperationLike, base: StandardizedLogger
) -> StandardizedLogger:
    """A StandardizedLogger bound to ``operation`` that writes events into ``session``."""
    log = base.with_events(SqlEventStore(session) if session is not None else None)
    bind_operation(log, operation)
    return log


def bind_operation(log: StandardizedLogger, operation: OperationLike) -> None:
    """Put ``operation``'s context (order, status, attempt, type) on ``log``'s records."""
    log.bind(
        operation.id,
        order_id=operation.order_id,
        status=operation.status,
        attempt=operation.retry_count + 1,
        operation_type=operation.operation_type,
    )


def transition(
    operation: PendingStockOperation,
    to_status: OperationStatus,
    reason: str,
    log: StandardizedLogger,
    additional_context: dict[str, Any] | None = None,
) -> None:
    """Move ``operation`` to ``to_status`` if the table allows it, stamp it, log it.

    The caller holds the row lock and commits. A new stage starts with a fresh retry budget;
    a final status keeps the count of the stage that ended there.
    """
    from_status = operation.status_enum
    ensure_transition(from_status, to_status, operation.type_enum)
    now = utcnow()
    operation.status = to_status.value
    if to_status not in FINAL_STATUSES:
        operation.retry_count = 0
        # its next stage is published once this commits (a chain link, or an enqueue)
        operation.dispatched_at = db_now()
    operation.attempt_started_at = None
    operation.next_retry_at = None
    operation.updated_at = now
    stamp = STAMP_COLUMNS.get(to_status)
    if stamp and getattr(operation, stamp) is None:
        setattr(operation, stamp, now)
    details = transition_details(
        operation.operation_type, to_status, created_at=operation.created_at, now=now
    )
    log.log_status_transition(
        operation.id, from_status, to_status, reason, {**details, **(additional_context or {})}
    )


def line_items_of(operation: OperationLike) -> list[LineItem]:
    return [LineItem.from_dict(item) for item in operation.line_items or []]


def new_order_deduction(order_id: str, account_name: str | None, now: datetime) -> dict[str, Any]:
    """The columns a new order deduction starts with: PENDING, no retry used, at its first
    dispatch (a submit's row, or a FAILED operation's successor)."""
    return {
        "id": uuid.uuid4(),
        "order_id": order_id,
        "account_name": account_name,
        "operation_type": OperationType.ORDER_DEDUCTION.value,
        "status": S.PENDING.value,
        "retry_count": 0,
        "deduction_retry_count": 0,
        "created_at": now,
        "updated_at": now,
        "dispatch_generation": FIRST_DISPATCH,
    }


def new_adjustment(
    parent: PendingStockOperation, operation_type: OperationType
) -> PendingStockOperation:
    """An adjustment operation recording one rollback step of ``parent``."""
    return PendingStockOperation(
        id=uuid.uuid4(),
        order_id=parent.order_id,
        account_name=parent.account_name,
        operation_type=operation_type.value,
        parent_operation_id=parent.id,
        status=S.PENDING.value,
        line_items=parent.line_items,
        created_at=utcnow(),
        updated_at=utcnow(),
        # published once the transaction commits (a restoration completes in it instead)
        dispatch_generation=FIRST_DISPATCH,
        dispatched_at=db_now(),
    )

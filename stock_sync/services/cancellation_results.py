"""What a cancellation did, read back from the database: the results the callers report
(CancellationResult, RollbackRetry, RollbackAgain) and the queries behind them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from stock_sync.adapters.models import PendingStockOperation, StockMovement
from stock_sync.adapters.operation_events import timeline
from stock_sync.adapters.stock_ledger import Movement
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.statuses import OperationStatus, OperationType

S = OperationStatus


@dataclass(frozen=True)
class CancellationResult:
    """What a cancellation did, as the caller (CLI, shop backend) reports it."""

    operation_id: uuid.UUID
    cancelled_from: OperationStatus
    final_status: OperationStatus
    stock_restored: bool
    restored_movements: tuple[Movement, ...]
    # not_needed | pending | completed | failed
    microservice_rollback: str
    adjustment_operation_ids: tuple[uuid.UUID, ...]
    message: str
    cancelled_by: str | None = None
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation_id": str(self.operation_id),
            "cancelled_from": self.cancelled_from.value,
            "final_status": self.final_status.value,
            "stock_restored": self.stock_restored,
            "restored_movements": [
                {"sku": m.sku, "quantity": m.delta, "line_item_id": m.line_item_id}
                for m in self.restored_movements
            ],
            "microservice_rollback": self.microservice_rollback,
            "adjustment_operation_ids": [str(i) for i in self.adjustment_operation_ids],
            "cancelled_by": self.cancelled_by,
            "reason": self.reason,
            "message": self.message,
        }


@dataclass(frozen=True)
class RollbackRetry:
    """A failed microservice rollback run again as a new adjustment of the cancelled operation."""

    operation_id: uuid.UUID  # the cancelled order deduction
    failed_rollback_id: uuid.UUID
    retry_rollback_id: uuid.UUID
    target_fulfillment_status: str
    enqueued: bool  # False: the broker refused; the stuck sweep re-drives it

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation_id": str(self.operation_id),
            "failed_rollback_id": str(self.failed_rollback_id),
            "retry_rollback_id": str(self.retry_rollback_id),
            "target_fulfillment_status": self.target_fulfillment_status,
            "enqueued": self.enqueued,
        }


@dataclass(frozen=True)
class RollbackAgain:
    """A microservice rollback made again by the marketplace audit's repair."""

    rollback_id: uuid.UUID
    enqueued: bool  # False: the broker refused (logged); the stuck sweep re-drives it


def latest_microservice_rollback(
    session: Session, operation: PendingStockOperation
) -> PendingStockOperation | None:
    """The operation's latest microservice rollback adjustment (the highest number), if
    any."""
    adjustment = PendingStockOperation
    return session.scalar(
        select(adjustment)
        .where(
            adjustment.parent_operation_id == operation.id,
            adjustment.operation_type == OperationType.MICROSERVICE_ROLLBACK.value,
        )
        .order_by(adjustment.rollback_seq.desc().nulls_last(), adjustment.id)
        .limit(1)
    )


def last_rollback_seq(session: Session, operation: PendingStockOperation) -> int | None:
    adjustment = PendingStockOperation
    return session.scalar(
        select(func.max(adjustment.rollback_seq)).where(
            adjustment.parent_operation_id == operation.id,
            adjustment.operation_type == OperationType.MICROSERVICE_ROLLBACK.value,
        )
    )


def cancellation_result(session: Session, operation: PendingStockOperation) -> CancellationResult:
    """The CancellationResult of ``operation``, read back from the database."""
    adjustment_ids = tuple(uuid.UUID(i) for i in operation.rollback_operations or [])
    restored = (
        tuple(
            Movement(row.sku, row.delta, row.line_item_id)
            for row in session.scalars(
                select(StockMovement)
                .where(StockMovement.operation_id.in_(adjustment_ids))
                .order_by(StockMovement.sku, StockMovement.line_item_id)
            )
        )
        if adjustment_ids
        else ()
    )
    rollback = latest_microservice_rollback(session, operation)
    microservice = _ROLLBACK_STATE.get(rollback.status, "pending") if rollback else "not_needed"
    cancelled_from = _cancelled_from(session, operation)
    message = _message(cancelled_from, restored, microservice)
    return CancellationResult(
        operation_id=operation.id,
        cancelled_from=cancelled_from,
        final_status=operation.status_enum,
        stock_restored=bool(restored),
        restored_movements=restored,
        microservice_rollback=microservice,
        adjustment_operation_ids=adjustment_ids,
        message=message,
        cancelled_by=operation.cancelled_by,
        reason=operation.cancellation_reason,
    )


_ROLLBACK_STATE = {
    S.PENDING.value: "pending",
    S.COMPLETED.value: "completed",
    S.FAILED.value: "failed",
}


def _cancelled_from(session: Session, operation: PendingStockOperation) -> OperationStatus:
    for event in reversed(timeline(session, operation.id)):
        if (
            event.action == LogAction.STATUS_TRANSITION.value
            and event.to_status == S.CANCELLED.value
        ):
            return OperationStatus(event.from_status)
    return operation.status_enum


def _message(
    cancelled_from: OperationStatus, restored: tuple[Movement, ...], microservice: str
) -> str:
    parts = [f"cancelled from {cancelled_from.value}"]
    if restored:
        parts.append("stock restored (" + ", ".join(f"{m.sku} +{m.delta}" for m in restored) + ")")
    else:
        parts.append("no stock to restore")
    parts.append(
        {
            "not_needed": "microservice untouched",
            "pending": "microservice rollback pending",
            "completed": "microservice status rolled back",
            "failed": "microservice rollback FAILED (needs an operator)",
        }[microservice]
    )
    return "; ".join(parts)

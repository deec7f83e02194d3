"""Read-only views of operations for the CLI: ``show`` and ``list``."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from stock_sync.adapters.models import PendingStockOperation
from stock_sync.adapters.operation_events import timeline
from stock_sync.domain.revisions import revision_from_text
from stock_sync.domain.statuses import OperationStatus
from stock_sync.services.operations import load_operation

STAGE_TIMESTAMPS = (
    "created_at",
    "updated_at",
    "line_items_loaded_at",
    "stock_deducted_at",
    "microservice_synced_at",
    "completed_at",
    "failed_at",
    "cancelled_at",
)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _id(value: uuid.UUID | None) -> str | None:
    return str(value) if value is not None else None


def operation_summary(operation: PendingStockOperation) -> dict[str, Any]:
    """The fields ``list`` shows for an operation."""
    return {
        "id": str(operation.id),
        "order_id": operation.order_id,
        "account_name": operation.account_name,
        "status": operation.status,
        "operation_type": operation.operation_type,
        "parent_operation_id": (
            str(operation.parent_operation_id) if operation.parent_operation_id else None
        ),
        "retry_count": operation.retry_count,
        # a FAILED operation retried by `stock-sync retry`, and the retry
        "retry_of": _id(operation.predecessor_operation_id),
        "retried_as": _id(operation.successor_operation_id),
        "created_at": _iso(operation.created_at),
        "updated_at": _iso(operation.updated_at),
    }


def operation_details(session: Session, operation_id: uuid.UUID) -> dict[str, Any]:
    """Everything ``show`` prints: the row, its line items and its timeline of events."""
    operation = load_operation(session, operation_id)
    details = operation_summary(operation)
    details.update({name: _iso(getattr(operation, name)) for name in STAGE_TIMESTAMPS})
    details.update(
        {
            "line_items": operation.line_items or [],
            "next_retry_at": _iso(operation.next_retry_at),
            "failed_stage": operation.failed_stage,
            "dispatched_at": _iso(operation.dispatched_at),
            "attempt_started_at": _iso(operation.attempt_started_at),
            "last_error": operation.last_error,
            "last_error_type": operation.last_error_type,
            "cancelled_by": operation.cancelled_by,
            "cancellation_reason": operation.cancellation_reason,
            "rollback_operations": operation.rollback_operations or [],
            "fulfillment_status_before_sync": operation.fulfillment_status_before_sync,
            # as the microservice sent it: a string token (Allegro) or an integer
            "order_revision": (
                revision_from_text(operation.order_revision)
                if operation.order_revision is not None
                else None
            ),
            "sync_put_sent_at": _iso(operation.sync_put_sent_at),
            "events": [
                {
                    "action": event.action,
                    "from_status": event.from_status,
                    "to_status": event.to_status,
                    "at": _iso(event.at),
                    "details": event.details or {},
                }
                for event in timeline(session, operation_id)
            ],
        }
    )
    return details


def list_operations(
    session: Session,
    *,
    status: OperationStatus | None = None,
    order_id: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Operations newest first, order deductions and adjustments alike."""
    statement = select(PendingStockOperation).order_by(
        PendingStockOperation.created_at.desc(), PendingStockOperation.id
    )
    if status is not None:
        statement = statement.where(PendingStockOperation.status == status.value)
    if order_id is not None:
        statement = statement.where(PendingStockOperation.order_id == order_id)
    return [operation_summary(row) for row in session.scalars(statement.limit(limit))]

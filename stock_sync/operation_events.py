"""The operation event table: the audit trail behind ``show`` timelines and the metrics."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from sqlalchemy import select
from sqlalchemy.orm import Session

from stock_sync.models import OperationEvent, utcnow


class SqlEventStore:
    """Writes audit events into the session's current transaction (never commits)."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def record(
        self,
        *,
        operation_id: UUID,
        action: str,
        from_status: str | None,
        to_status: str | None,
        error_type: str | None,
        details: dict[str, Any],
    ) -> None:
        self._session.add(
            OperationEvent(
                operation_id=operation_id,
                action=action,
                from_status=from_status,
                to_status=to_status,
                error_type=error_type,
                details=details,
                at=utcnow(),
            )
        )


def timeline(session: Session, operation_id: UUID) -> list[OperationEvent]:
    """Every event of an operation, oldest first."""
    return list(
        session.scalars(
            select(OperationEvent)
            .where(OperationEvent.operation_id == operation_id)
            .order_by(OperationEvent.id)
        )
    )

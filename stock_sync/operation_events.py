"""The operation event table: the audit trail behind ``show`` timelines and the metrics."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from sqlalchemy import event, insert, select
from sqlalchemy.orm import Session

from stock_sync.models import OPERATION_EVENTS_TABLE, OperationEvent, utcnow

_PENDING_EVENTS = "stock_sync.pending_events"


class SqlEventStore:
    """Writes audit events into the session's current transaction (never commits).

    Events are buffered and written as one multi-row INSERT just before the transaction
    commits (a stage writes several: one statement instead of one per event, and no autoflush
    splitting them). They commit, or roll back, with the change they record.
    """

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
        self._session.info.setdefault(_PENDING_EVENTS, []).append(
            {
                "operation_id": operation_id,
                "action": action,
                "from_status": from_status,
                "to_status": to_status,
                "error_type": error_type,
                "details": details,
                "at": utcnow(),
            }
        )


class DeferredEvents:
    """Events of a step that ran outside any transaction (a lock-free check, an HTTP call),
    kept until the transaction that records its outcome writes them, in order, first."""

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []

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
        self._events.append(
            {
                "operation_id": operation_id,
                "action": action,
                "from_status": from_status,
                "to_status": to_status,
                "error_type": error_type,
                "details": details,
                "at": utcnow(),
            }
        )

    def write_into(self, session: Session) -> None:
        session.info.setdefault(_PENDING_EVENTS, []).extend(self._events)
        self._events = []


@event.listens_for(Session, "before_commit")
def _write_pending_events(session: Session) -> None:
    """One INSERT for the events of the transaction, after the rows they refer to."""
    pending = session.info.pop(_PENDING_EVENTS, None)
    if pending:
        session.flush()  # a new operation row must exist before its events point at it
        # Core, not the ORM's bulk insert: nothing is loaded back, one multi-row statement.
        session.connection().execute(insert(OPERATION_EVENTS_TABLE), pending)


@event.listens_for(Session, "after_rollback")
def _drop_pending_events(session: Session) -> None:
    session.info.pop(_PENDING_EVENTS, None)


def timeline(session: Session, operation_id: UUID) -> list[OperationEvent]:
    """Every event of an operation, oldest first."""
    return list(
        session.scalars(
            select(OperationEvent)
            .where(OperationEvent.operation_id == operation_id)
            .order_by(OperationEvent.id)
        )
    )

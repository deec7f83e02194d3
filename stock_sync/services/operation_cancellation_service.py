"""OperationCancellationService: cancel an operation at any stage and undo what it did.

A rollback reverses exactly what was recorded: the operation's own deduction rows are negated
in the ledger, and the microservice is put back to the fulfillment status recorded before the
sync. Each undo step is an adjustment operation (its own row, ledger rows and status). The
stock part happens in the same transaction as the move to CANCELLED; the microservice part
is HTTP, so it runs afterwards as the ``rollback`` task, with the usual retries.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from stock_sync.adapters.db import Database
from stock_sync.adapters.microservice_client import MicroserviceClient
from stock_sync.adapters.models import PendingStockOperation, StockMovement
from stock_sync.adapters.operation_events import timeline
from stock_sync.adapters.operation_rows import start_attempt
from stock_sync.adapters.stock_ledger import Movement, restore_for_operation
from stock_sync.domain.errors import CancellationRefused, RollbackRetryRefused
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.revisions import Revision, revision_from_text, same_revision
from stock_sync.domain.stages import StageOutcome
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.domain.text import checked_text
from stock_sync.services.operations import (
    FIRST_DISPATCH,
    load_operation,
    new_adjustment,
    operation_logger,
    transition,
)
from stock_sync.services.standardized_logger import (
    StandardizedLogger,
    Timer,
    measure_execution_time,
)

S = OperationStatus
CANCELLED_BY_MAX_LENGTH = 128
REASON_MAX_LENGTH = 2000


class RollbackDispatcher(Protocol):
    """Enqueues the microservice rollback task (the Celery side implements it)."""

    def enqueue_rollback(self, adjustment_operation_id: uuid.UUID, generation: int) -> None: ...


def rollback_idempotency_key(adjustment_operation_id: uuid.UUID) -> str:
    return f"stock-sync:{adjustment_operation_id}:rollback"


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


class OperationCancellationService:
    """Cancels operations (the seed's interface) and runs the microservice rollback step."""

    def __init__(
        self,
        *,
        database: Database,
        client: MicroserviceClient,
        logger: StandardizedLogger,
        dispatcher: RollbackDispatcher,
    ) -> None:
        self._database = database
        self._client = client
        self._logger = logger
        self._dispatcher = dispatcher

    # --- cancel ------------------------------------------------------------------------

    def cancel_operation(
        self, operation_id: uuid.UUID, cancelled_by: str = "operator", reason: str | None = None
    ) -> CancellationResult:
        """Cancel ``operation_id`` and roll back what it changed.

        Cancelling an already cancelled operation returns its first result and changes
        nothing; FAILED is final and refused; an unknown id raises OperationNotFound.
        """
        cancelled_by = checked_text(
            "cancelled_by", cancelled_by, max_length=CANCELLED_BY_MAX_LENGTH
        )
        reason = checked_text(
            "reason", "cancelled" if reason is None else reason, max_length=REASON_MAX_LENGTH
        )
        rollback_to_enqueue: uuid.UUID | None = None
        timer = Timer()
        with self._database.transaction() as session:
            operation = load_operation(session, operation_id, for_update=True)
            if operation.type_enum is not OperationType.ORDER_DEDUCTION:
                raise CancellationRefused(
                    operation_id, f"an adjustment ({operation.operation_type})"
                )
            if operation.status_enum is S.CANCELLED:
                return self._result_of(session, operation)
            if operation.status_enum is S.FAILED:
                raise CancellationRefused(operation_id, operation.status)
            log = operation_logger(session, operation, self._logger)
            cancelled_from = operation.status_enum
            log.log_action_with_timing(
                operation_id,
                LogAction.CANCELLATION_REQUESTED,
                f"cancellation requested by {cancelled_by}: {reason}",
            )
            adjustments: list[uuid.UUID] = []
            if cancelled_from in (S.STOCK_DEDUCTED, S.COMPLETED):
                restoration = self._rollback_stock_changes(session, operation, log)
                if restoration is not None:
                    adjustments.append(restoration)
            # Not only from COMPLETED: a sync PUT whose answer was lost (timeout, reset, 5xx,
            # killed worker) may have landed while the row still says STOCK_DEDUCTED.
            rollback_to_enqueue = self._create_adjustment_operation(
                session, operation, OperationType.MICROSERVICE_ROLLBACK.value, log
            )
            if rollback_to_enqueue is not None:
                adjustments.append(rollback_to_enqueue)
            operation.cancelled_by = cancelled_by
            operation.cancellation_reason = reason
            operation.rollback_operations = [str(i) for i in adjustments]
            transition(operation, S.CANCELLED, f"cancelled by {cancelled_by}: {reason}", log)
            if rollback_to_enqueue is None:
                log.log_action_with_timing(
                    operation_id,
                    LogAction.CANCELLATION_COMPLETED,
                    "cancellation completed",
                    timer.elapsed_ms,
                )
        if rollback_to_enqueue is not None:
            self._rollback_microservice_status(rollback_to_enqueue)
        with self._database.transaction() as session:
            return self._result_of(session, load_operation(session, operation_id))

    def _rollback_stock_changes(
        self, session: Session, operation: PendingStockOperation, log: StandardizedLogger
    ) -> uuid.UUID | None:
        """Negate the operation's deduction rows under a restoration adjustment (same
        transaction as the cancel); None when nothing had been deducted."""
        adjustment = new_adjustment(operation, OperationType.STOCK_RESTORATION)
        session.add(adjustment)
        session.flush()
        log.log_action_with_timing(
            operation.id, LogAction.STOCK_ROLLBACK_STARTED, "restoring deducted stock"
        )
        with measure_execution_time() as timer:
            outcome = restore_for_operation(session, operation.id, adjustment.id)
        if not outcome.movements:
            session.delete(adjustment)
            log.log_action_with_timing(
                operation.id,
                LogAction.STOCK_ROLLBACK_COMPLETED,
                "nothing was deducted",
                timer.elapsed_ms,
            )
            return None
        adjustment_log = operation_logger(session, adjustment, self._logger)
        transition(adjustment, S.COMPLETED, f"restored stock of {operation.id}", adjustment_log)
        log.log_action_with_timing(
            operation.id,
            LogAction.STOCK_ROLLBACK_COMPLETED,
            "restored " + ", ".join(f"{m.sku} +{m.delta}" for m in outcome.movements),
            timer.elapsed_ms,
        )
        return adjustment.id

    def _create_adjustment_operation(
        self,
        session: Session,
        operation: PendingStockOperation,
        adjustment_type: str,
        log: StandardizedLogger,
        *,
        after_landed_put: bool = False,
    ) -> uuid.UUID | None:
        """A microservice rollback adjustment putting back the pre-sync fulfillment status.

        None when no sync PUT was ever sent, or when a rollback exists that will read the order
        after any PUT that can still land. ``after_landed_put``: a sync PUT is known to have
        landed just now, so a rollback that already finished may have read the order before
        it and a new one is made.
        """
        if operation.sync_put_sent_at is None or operation.fulfillment_status_before_sync is None:
            return None
        latest = self._microservice_rollback_of(session, operation)
        if latest is not None and (not after_landed_put or latest.status_enum is S.PENDING):
            return None
        return self._add_microservice_rollback(
            session, operation, log, adjustment_type=OperationType(adjustment_type)
        )

    def _rollback_microservice_status(self, adjustment_operation_id: uuid.UUID) -> bool:
        """Enqueue the rollback task; False when the broker refused (the sweep re-drives)."""
        try:
            # a new adjustment is at its first dispatch (see services.operations.new_adjustment)
            self._dispatcher.enqueue_rollback(adjustment_operation_id, FIRST_DISPATCH)
        except Exception:
            return False
        return True

    def compensate_if_cancelled(self, operation_id: uuid.UUID, *, put_landed: bool = False) -> bool:
        """Called by a sync whose PUT may have landed (or, ``put_landed``, did land): if a
        cancellation won meanwhile, make sure a rollback reads the order after that PUT.

        Returns True when the operation is CANCELLED (the caller must stop)."""
        with self._database.transaction() as session:
            operation = load_operation(session, operation_id, for_update=True)
            if operation.status_enum is not S.CANCELLED:
                return False
            log = operation_logger(session, operation, self._logger)
            adjustment_id = self._create_adjustment_operation(
                session,
                operation,
                OperationType.MICROSERVICE_ROLLBACK.value,
                log,
                after_landed_put=put_landed,
            )
            if adjustment_id is not None:
                operation.rollback_operations = [
                    *(operation.rollback_operations or []),
                    str(adjustment_id),
                ]
        if adjustment_id is not None:
            self._rollback_microservice_status(adjustment_id)
        return True

    # --- an operator's way out of a failed rollback ----------------------------------------

    def retry_microservice_rollback(self, operation_id: uuid.UUID) -> RollbackRetry:
        """Run a failed microservice rollback again, as a new adjustment of its operation.

        ``operation_id`` is the FAILED ``microservice_rollback`` adjustment or the cancelled
        operation it belongs to. Refused (RollbackRetryRefused) unless the operation's latest
        microservice rollback is FAILED: one pending will run anyway, and after one that
        completed the fulfillment status is back already. The new adjustment, with a fresh
        retry budget, puts back the status recorded before the sync (as the first did), is
        listed in the operation's ``rollback_operations`` and is enqueued after the commit.
        """
        with self._database.transaction() as session:
            parent = _cancelled_parent(session, operation_id)
            failed = _failed_latest_rollback(
                operation_id, self._microservice_rollback_of(session, parent)
            )
            log = operation_logger(session, parent, self._logger)
            retry_id = self._add_microservice_rollback(
                session, parent, log, note=f"retry of the failed rollback {failed.id}: "
            )
            parent.rollback_operations = [*(parent.rollback_operations or []), str(retry_id)]
            target = str(parent.fulfillment_status_before_sync)
        enqueued = self._rollback_microservice_status(retry_id)
        return RollbackRetry(parent.id, failed.id, retry_id, target, enqueued)

    def _add_microservice_rollback(
        self,
        session: Session,
        operation: PendingStockOperation,
        log: StandardizedLogger,
        *,
        adjustment_type: OperationType = OperationType.MICROSERVICE_ROLLBACK,
        note: str = "",
    ) -> uuid.UUID:
        """A new microservice rollback adjustment of ``operation``, announced on its timeline."""
        adjustment = new_adjustment(operation, adjustment_type)
        adjustment.target_fulfillment_status = operation.fulfillment_status_before_sync
        session.add(adjustment)
        session.flush()
        log.log_action_with_timing(
            operation.id,
            LogAction.MICROSERVICE_ROLLBACK_STARTED,
            f"{note}fulfillment status to be put back to {adjustment.target_fulfillment_status}",
        )
        return adjustment.id

    # --- the rollback task's work ----------------------------------------------------------

    def rollback_microservice(
        self, adjustment_operation_id: uuid.UUID, generation: int | None = None
    ) -> StageOutcome:
        """Put the microservice back to the recorded status; raises for the task to retry.

        It reads the order first and PUTs only when the fulfillment status differs from the
        one to restore, or when the order is still at the revision our last sync PUT carried:
        that PUT may still land (its answer was lost, not the request), and a PUT of the same
        status moves the revision on, so the late PUT gets a 409 instead of taking effect.
        """
        with self._database.single_statement() as connection:
            started = start_attempt(connection, adjustment_operation_id, S.PENDING, generation)
        with self._database.transaction() as session:
            adjustment = load_operation(session, adjustment_operation_id)
            if adjustment.status_enum is not S.PENDING:
                return StageOutcome.ALREADY_PAST
            if started is None:  # a copy of an older dispatch: the newer one runs it
                return StageOutcome.STOPPED
            order_id, target = adjustment.order_id, adjustment.target_fulfillment_status
            parent_id = adjustment.parent_operation_id
            assert target is not None and parent_id is not None
            parent = load_operation(session, parent_id)
            sync_revision = (
                revision_from_text(parent.order_revision)
                if parent.sync_put_sent_at and parent.order_revision
                else None
            )
        with measure_execution_time() as timer:
            order = self._client.get_order(order_id)
            action = _rollback_action(
                order.fulfillment_status, order.revision, target, sync_revision
            )
            if action is not _RollbackAction.NOTHING:
                self._client.set_fulfillment_status(
                    order_id,
                    status=target,
                    expected_revision=order.revision,
                    idempotency_key=rollback_idempotency_key(adjustment_operation_id),
                )
        with self._database.transaction() as session:
            parent = load_operation(session, parent_id, for_update=True)  # parent first: lock order
            adjustment = load_operation(session, adjustment_operation_id, for_update=True)
            if adjustment.status_enum is not S.PENDING:
                return StageOutcome.ALREADY_PAST
            transition(
                adjustment,
                S.COMPLETED,
                f"fulfillment {action.value} {target}",
                operation_logger(session, adjustment, self._logger),
            )
            log = operation_logger(session, parent, self._logger)
            log.log_action_with_timing(
                parent_id,
                LogAction.MICROSERVICE_ROLLBACK_COMPLETED,
                f"fulfillment status {action.value} {target}",
                timer.elapsed_ms,
            )
            log.log_action_with_timing(
                parent_id, LogAction.CANCELLATION_COMPLETED, "cancellation completed"
            )
        return StageOutcome.DONE

    def report_rollback_failed(self, session: Session, adjustment: PendingStockOperation) -> None:
        """Note on the parent that its microservice rollback gave up (stock stays restored)."""
        if adjustment.parent_operation_id is None:
            return
        parent = load_operation(session, adjustment.parent_operation_id)
        operation_logger(session, parent, self._logger).log_action_with_timing(
            parent.id,
            LogAction.CANCELLATION_COMPLETED,
            f"stock restored, but the microservice rollback {adjustment.id} failed: "
            f"fulfillment was not put back to {adjustment.target_fulfillment_status}",
            status="error",
        )

    # --- results ---------------------------------------------------------------------------

    def _microservice_rollback_of(
        self, session: Session, operation: PendingStockOperation
    ) -> PendingStockOperation | None:
        """The operation's latest microservice rollback adjustment, if any."""
        adjustment = PendingStockOperation
        return session.scalar(
            select(adjustment)
            .where(
                adjustment.parent_operation_id == operation.id,
                adjustment.operation_type == OperationType.MICROSERVICE_ROLLBACK.value,
            )
            .order_by(adjustment.created_at.desc(), adjustment.id)
            .limit(1)
        )

    def result_of(self, operation_id: uuid.UUID) -> CancellationResult:
        """The CancellationResult of a cancelled operation, read back from the database."""
        with self._database.transaction() as session:
            return self._result_of(session, load_operation(session, operation_id))

    def _result_of(self, session: Session, operation: PendingStockOperation) -> CancellationResult:
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
        rollback = self._microservice_rollback_of(session, operation)
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


def _cancelled_parent(session: Session, operation_id: uuid.UUID) -> PendingStockOperation:
    """The cancelled order deduction ``operation_id`` is (or whose rollback it is), locked:
    a cancel, a sync's compensation and a rollback's completion lock it too."""
    operation = load_operation(session, operation_id)
    if operation.type_enum is OperationType.MICROSERVICE_ROLLBACK:
        if operation.status_enum is not S.FAILED:
            raise RollbackRetryRefused(operation_id, f"it is {operation.status}, not failed")
        assert operation.parent_operation_id is not None
        parent = load_operation(session, operation.parent_operation_id, for_update=True)
    elif operation.type_enum is OperationType.ORDER_DEDUCTION:
        parent = load_operation(session, operation_id, for_update=True)
    else:
        raise RollbackRetryRefused(
            operation_id, f"it is a {operation.operation_type} adjustment, not a rollback"
        )
    if parent.status_enum is not S.CANCELLED:
        raise RollbackRetryRefused(operation_id, f"operation {parent.id} is {parent.status}")
    return parent


def _failed_latest_rollback(
    operation_id: uuid.UUID, latest: PendingStockOperation | None
) -> PendingStockOperation:
    """The operation's latest microservice rollback, when it is the FAILED one to retry."""
    if latest is None:
        raise RollbackRetryRefused(operation_id, "its operation has no microservice rollback")
    if latest.status_enum is S.PENDING:
        raise RollbackRetryRefused(operation_id, f"rollback {latest.id} is pending")
    if latest.status_enum is S.COMPLETED:
        raise RollbackRetryRefused(
            operation_id, f"rollback {latest.id} completed: the fulfillment status is back"
        )
    return latest


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


class _RollbackAction(str, Enum):
    """What a microservice rollback did; the value completes "fulfillment ... TARGET"."""

    PUT_BACK = "put back to"
    FENCED = "kept at"  # same status PUT so that a late sync PUT meets a new revision
    NOTHING = "already at"


def _rollback_action(
    current_status: str, current_revision: Revision, target: str, sync_revision: Revision | None
) -> _RollbackAction:
    if current_status != target:
        return _RollbackAction.PUT_BACK
    if sync_revision is not None and same_revision(current_revision, sync_revision):
        return _RollbackAction.FENCED
    return _RollbackAction.NOTHING


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

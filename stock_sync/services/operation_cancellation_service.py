"""OperationCancellationService: cancel an operation at any stage and undo what it did.

A rollback reverses exactly what was recorded: the operation's own deduction rows are negated
in the ledger, and the microservice is put back to the fulfillment status recorded before the
sync. Each undo step is an adjustment operation (its own row, ledger rows and status). The
stock part happens in the same transaction as the move to CANCELLED; the microservice part
is HTTP, so it runs afterwards as the ``rollback`` task, with the usual retries.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from stock_sync.adapters.db import Database
from stock_sync.adapters.microservice_client import MicroserviceClient
from stock_sync.adapters.models import PendingStockOperation, StockMovement
from stock_sync.adapters.operation_events import timeline
from stock_sync.adapters.operation_rows import start_attempt
from stock_sync.adapters.redaction import one_line
from stock_sync.adapters.stock_ledger import Movement, restore_for_operation
from stock_sync.domain.errors import (
    CancellationRefused,
    IdempotencyKeyReused,
    RevisionConflict,
    RollbackRetryRefused,
)
from stock_sync.domain.idempotency import RecordedPut, rollback_key
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.marketplace import SYNCED_FULFILLMENT_STATUS
from stock_sync.domain.revisions import revision_from_text, revision_to_text
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
logger = logging.getLogger("stock_sync.cancellation")
# Who cancels an operation whose order was cancelled upstream (by the buyer, on Allegro).
MARKETPLACE = "marketplace"
CANCELLED_BY_MAX_LENGTH = 128
REASON_MAX_LENGTH = 2000


class RollbackDispatcher(Protocol):
    """Enqueues the microservice rollback task (the Celery side implements it)."""

    def enqueue_rollback(self, adjustment_operation_id: uuid.UUID, generation: int) -> None: ...


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
        Cancelled by ``marketplace`` (the order was cancelled upstream), the stock is restored
        but no PUT is sent: the marketplace cancelled the order itself.
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
            if cancelled_by != MARKETPLACE:
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
        """Enqueue the rollback task; False (logged) when the broker refused: the adjustment
        is recorded as dispatched, so the sweep re-drives it once a probe has passed it."""
        try:
            # a new adjustment is at its first dispatch (see services.operations.new_adjustment)
            self._dispatcher.enqueue_rollback(adjustment_operation_id, FIRST_DISPATCH)
        except Exception as error:
            logger.warning(
                "microservice rollback %s not enqueued (%s): the stuck sweep will re-drive it",
                adjustment_operation_id,
                one_line(str(error)),
                extra={"operation_id": str(adjustment_operation_id)},
            )
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

    def roll_back_again(self, operation_id: uuid.UUID, reason: str) -> uuid.UUID | None:
        """A new microservice rollback of the CANCELLED operation ``operation_id``, enqueued
        (the marketplace audit found its order still at the sync's status); None when one is
        pending already (it claims and reads after any PUT) or the operation is not CANCELLED
        any more."""
        with self._database.transaction() as session:
            parent = load_operation(session, operation_id, for_update=True)
            latest = self._microservice_rollback_of(session, parent)
            if parent.status_enum is not S.CANCELLED or (
                latest is not None and latest.status_enum is S.PENDING
            ):
                return None
            log = operation_logger(session, parent, self._logger)
            rollback_id = self._add_microservice_rollback(session, parent, log, note=f"{reason}: ")
            parent.rollback_operations = [*(parent.rollback_operations or []), str(rollback_id)]
        self._rollback_microservice_status(rollback_id)
        return rollback_id

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
        # numbered under the parent's lock (every caller holds it): "latest" never depends
        # on which host's clock stamped created_at
        adjustment.rollback_seq = 1 + (self._last_rollback_seq(session, operation) or 0)
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

        First it *claims* every sync PUT its operation may have sent: each is sent again with
        its own key and body (recorded before it first left). Whatever each answers (204: it
        applied now or before; 409 revision conflict: refused), the key is then answered, so
        a copy still held in a proxy or a queue is a replay with no effect when it arrives;
        one still in flight at the wrapper (409 in flight) makes the rollback retry later.
        Only then is the order read: no sync PUT can change it afterwards. A fulfillment at
        the sync's status is put back to the recorded one, with a key of this rollback's
        for that revision (a retry after a 409 is another payload, another key). Nothing is
        sent when it is back already, when the seller moved it on, or when the order was
        cancelled upstream.
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
            claims = [RecordedPut.from_dict(raw) for raw in parent.sync_puts or []]
        with measure_execution_time() as timer:
            for put in claims:
                self._claim(order_id, put)
            order = self._client.get_order(order_id)
            action = _rollback_action(order.status, order.fulfillment_status, target)
            if action is _RollbackAction.PUT_BACK:
                revision = revision_to_text(order.revision)
                self._client.set_fulfillment_status(
                    order_id,
                    status=target,
                    expected_revision=order.revision,
                    idempotency_key=rollback_key(adjustment_operation_id, revision),
                )
        with self._database.transaction() as session:
            parent = load_operation(session, parent_id, for_update=True)  # parent first: lock order
            adjustment = load_operation(session, adjustment_operation_id, for_update=True)
            if adjustment.status_enum is not S.PENDING:
                return StageOutcome.ALREADY_PAST
            outcome = _describe(action, target, order.fulfillment_status)
            transition(
                adjustment,
                S.COMPLETED,
                outcome,
                operation_logger(session, adjustment, self._logger),
            )
            log = operation_logger(session, parent, self._logger)
            log.log_action_with_timing(
                parent_id,
                LogAction.MICROSERVICE_ROLLBACK_COMPLETED,
                f"{outcome} ({len(claims)} sync PUT(s) claimed first)",
                timer.elapsed_ms,
            )
            log.log_action_with_timing(
                parent_id, LogAction.CANCELLATION_COMPLETED, "cancellation completed"
            )
        return StageOutcome.DONE

    def _claim(self, order_id: str, put: RecordedPut) -> None:
        """Send a recorded sync PUT again, exactly: afterwards its key is answered, so no copy
        of it can take effect later. A refusal (409 revision conflict) answers it as well as
        a 204; in flight (409) and transient errors propagate (retry the rollback)."""
        # refused (the order moved past the revision this PUT expects), or the key is bound
        # to another body (a key of an older release, reused with other revisions): either
        # way no copy of this body can take effect any more
        with contextlib.suppress(RevisionConflict, IdempotencyKeyReused):
            self._client.set_fulfillment_status(
                order_id,
                status=SYNCED_FULFILLMENT_STATUS,
                expected_revision=revision_from_text(put.expected_revision),
                idempotency_key=put.key,
            )

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

    @staticmethod
    def _last_rollback_seq(session: Session, operation: PendingStockOperation) -> int | None:
        adjustment = PendingStockOperation
        return session.scalar(
            select(func.max(adjustment.rollback_seq)).where(
                adjustment.parent_operation_id == operation.id,
                adjustment.operation_type == OperationType.MICROSERVICE_ROLLBACK.value,
            )
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
    """What a microservice rollback found after its claims, and so did."""

    PUT_BACK = "put back"
    NOTHING = "already back"
    MOVED_ON = "moved on by the seller"
    CANCELLED_UPSTREAM = "cancelled upstream"


def _rollback_action(order_status: str, fulfillment: str, target: str) -> _RollbackAction:
    if order_status == "CANCELLED":
        return _RollbackAction.CANCELLED_UPSTREAM  # the marketplace cancelled it: leave it
    if fulfillment == target:
        return _RollbackAction.NOTHING
    if fulfillment == SYNCED_FULFILLMENT_STATUS:
        return _RollbackAction.PUT_BACK
    return _RollbackAction.MOVED_ON  # READY_FOR_SHIPMENT, SENT...: not ours to undo


def _describe(action: _RollbackAction, target: str, found: str) -> str:
    return {
        _RollbackAction.PUT_BACK: f"fulfillment put back to {target}",
        _RollbackAction.NOTHING: f"fulfillment already at {target}",
        _RollbackAction.MOVED_ON: f"fulfillment left at {found}: the seller moved it on",
        _RollbackAction.CANCELLED_UPSTREAM: "order cancelled upstream: fulfillment left as is",
    }[action]


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

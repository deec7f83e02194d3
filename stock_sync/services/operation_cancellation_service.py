"""OperationCancellationService: cancel an operation at any stage and undo what it did.

A rollback reverses exactly what was recorded: the operation's own deduction rows are negated
in the ledger, and the microservice is put back to the fulfillment status recorded before the
sync. Each undo step is an adjustment operation (its own row, ledger rows and status). The
stock part happens in the same transaction as the move to CANCELLED; the microservice part
is HTTP, so it runs afterwards as the ``rollback`` stage, registered with the StageRunner
(which gives it the usual retries). The results it reports are in cancellation_results.py.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass, replace
from enum import Enum
from typing import Protocol

from sqlalchemy.orm import Session

from stock_sync.adapters.db import Database
from stock_sync.adapters.marketplace_contract import MicroserviceOrder
from stock_sync.adapters.microservice_client import MicroserviceClient
from stock_sync.adapters.models import PendingStockOperation
from stock_sync.adapters.operation_rows import start_attempt
from stock_sync.adapters.redaction import one_line
from stock_sync.adapters.stock_ledger import restore_for_operation
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
from stock_sync.domain.stages import ROLLBACK, StageOutcome
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.domain.text import checked_text
from stock_sync.services.cancellation_results import (
    CancellationResult,
    RollbackAgain,
    RollbackRetry,
    cancellation_result,
    last_rollback_seq,
    latest_microservice_rollback,
)
from stock_sync.services.operations import (
    FIRST_DISPATCH,
    load_operation,
    new_adjustment,
    operation_logger,
    transition,
)
from stock_sync.services.stage_runner import StageRunner
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


class OperationCancellationService:
    """Cancels operations (the seed's interface) and runs the microservice rollback step."""

    def __init__(
        self,
        *,
        database: Database,
        client: MicroserviceClient,
        logger: StandardizedLogger,
        dispatcher: RollbackDispatcher,
        runner: StageRunner,
    ) -> None:
        self._database = database
        self._client = client
        self._logger = logger
        self._dispatcher = dispatcher
        runner.register(ROLLBACK, self.rollback_microservice)
        runner.on_failed(OperationType.MICROSERVICE_ROLLBACK, self.report_rollback_failed)

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
        timer = Timer()
        with self._database.transaction() as session:
            operation = _cancellable(session, operation_id)
            if operation.status_enum is S.CANCELLED:
                return cancellation_result(session, operation)
            rollback = self._cancel(session, operation, cancelled_by, reason, timer)
        if rollback is not None and not self._enqueue_rollback(rollback):
            result = self.result_of(operation_id)  # the rollback waits for the stuck sweep
            return replace(result, details={**result.details, "rollback_enqueued": False})
        return self.result_of(operation_id)

    def _cancel(
        self,
        session: Session,
        operation: PendingStockOperation,
        cancelled_by: str,
        reason: str,
        timer: Timer,
    ) -> uuid.UUID | None:
        """Cancel ``operation`` (locked) in ``session``: its stock restored, a microservice
        rollback recorded when a sync PUT may have left. Returns that rollback, to enqueue
        once this commits."""
        log = operation_logger(session, operation, self._logger)
        log.log_action_with_timing(
            operation.id,
            LogAction.CANCELLATION_REQUESTED,
            f"cancellation requested by {cancelled_by}: {reason}",
        )
        restoration = None
        if operation.status_enum in (S.STOCK_DEDUCTED, S.COMPLETED):
            restoration = self._rollback_stock_changes(session, operation, log)
        # Not only from COMPLETED: a sync PUT whose answer was lost (timeout, reset, 5xx,
        # killed worker) may have landed while the row still says STOCK_DEDUCTED.
        rollback = None
        if cancelled_by != MARKETPLACE:
            rollback = self._create_adjustment_operation(
                session, operation, OperationType.MICROSERVICE_ROLLBACK.value, log
            )
        adjustments = [i for i in (restoration, rollback) if i is not None]
        operation.cancelled_by = cancelled_by
        operation.cancellation_reason = reason
        operation.rollback_operations = [str(i) for i in adjustments]
        transition(operation, S.CANCELLED, f"cancelled by {cancelled_by}: {reason}", log)
        if rollback is None:
            log.log_action_with_timing(
                operation.id,
                LogAction.CANCELLATION_COMPLETED,
                "cancellation completed",
                timer.elapsed_ms,
            )
        return rollback

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
        latest = latest_microservice_rollback(session, operation)
        if latest is not None and (not after_landed_put or latest.status_enum is S.PENDING):
            return None
        return self._add_microservice_rollback(
            session, operation, log, adjustment_type=OperationType(adjustment_type)
        )

    def _enqueue_rollback(self, adjustment_operation_id: uuid.UUID) -> bool:
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
                _list_rollback(operation, adjustment_id)
        if adjustment_id is not None:
            # stopping is right either way: a rollback not enqueued (logged) waits in its row
            # for the stuck sweep, which re-drives it
            self._enqueue_rollback(adjustment_id)
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
                operation_id, latest_microservice_rollback(session, parent)
            )
            log = operation_logger(session, parent, self._logger)
            retry_id = self._add_microservice_rollback(
                session, parent, log, note=f"retry of the failed rollback {failed.id}: "
            )
            _list_rollback(parent, retry_id)
            target = str(parent.fulfillment_status_before_sync)
        enqueued = self._enqueue_rollback(retry_id)
        return RollbackRetry(parent.id, failed.id, retry_id, target, enqueued)

    def roll_back_again(self, operation_id: uuid.UUID, reason: str) -> RollbackAgain | None:
        """A new microservice rollback of the CANCELLED operation ``operation_id``, enqueued
        (the marketplace audit found its order still at the sync's status); None when one is
        pending already (it claims and reads after any PUT) or the operation is not CANCELLED
        any more."""
        with self._database.transaction() as session:
            parent = load_operation(session, operation_id, for_update=True)
            latest = latest_microservice_rollback(session, parent)
            if parent.status_enum is not S.CANCELLED or (
                latest is not None and latest.status_enum is S.PENDING
            ):
                return None
            log = operation_logger(session, parent, self._logger)
            rollback_id = self._add_microservice_rollback(session, parent, log, note=f"{reason}: ")
            _list_rollback(parent, rollback_id)
        return RollbackAgain(rollback_id, enqueued=self._enqueue_rollback(rollback_id))

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
        adjustment.rollback_seq = 1 + (last_rollback_seq(session, operation) or 0)
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
        plan = self._rollback_plan(adjustment_operation_id, generation)
        if isinstance(plan, StageOutcome):
            return plan
        with measure_execution_time() as timer:
            for put in plan.claims:
                self._claim(plan.order_id, put)
            order = self._client.get_order(plan.order_id)
            action = _rollback_action(order.status, order.fulfillment_status, plan.target)
            if action is _RollbackAction.PUT_BACK:
                self._client.set_fulfillment_status(
                    plan.order_id,
                    status=plan.target,
                    expected_revision=order.revision,
                    idempotency_key=rollback_key(
                        adjustment_operation_id, revision_to_text(order.revision)
                    ),
                )
        return self._complete_rollback(plan, _describe(action, plan.target, order), timer)

    def _rollback_plan(
        self, adjustment_operation_id: uuid.UUID, generation: int | None
    ) -> _RollbackPlan | StageOutcome:
        """What a rollback run must do, read with its attempt stamped; or the outcome to
        return at once (it completed already, or this is a copy of an older dispatch)."""
        with self._database.single_statement() as connection:
            started = start_attempt(connection, adjustment_operation_id, S.PENDING, generation)
        with self._database.transaction() as session:
            adjustment = load_operation(session, adjustment_operation_id)
            if adjustment.status_enum is not S.PENDING:
                return StageOutcome.ALREADY_PAST
            if started is None:  # a copy of an older dispatch: the newer one runs it
                return StageOutcome.STOPPED
            target, parent_id = adjustment.target_fulfillment_status, adjustment.parent_operation_id
            assert target is not None and parent_id is not None
            parent = load_operation(session, parent_id)
            claims = tuple(RecordedPut.from_dict(raw) for raw in parent.sync_puts or [])
            return _RollbackPlan(adjustment.id, parent_id, adjustment.order_id, target, claims)

    def _complete_rollback(self, plan: _RollbackPlan, outcome: str, timer: Timer) -> StageOutcome:
        """COMPLETED for the rollback, and the cancellation it belongs to completed."""
        with self._database.transaction() as session:
            # parent first: the lock order of every writer
            parent = load_operation(session, plan.parent_id, for_update=True)
            adjustment = load_operation(session, plan.adjustment_id, for_update=True)
            if adjustment.status_enum is not S.PENDING:
                return StageOutcome.ALREADY_PAST
            adjustment_log = operation_logger(session, adjustment, self._logger)
            transition(adjustment, S.COMPLETED, outcome, adjustment_log)
            log = operation_logger(session, parent, self._logger)
            log.log_action_with_timing(
                parent.id,
                LogAction.MICROSERVICE_ROLLBACK_COMPLETED,
                f"{outcome} ({len(plan.claims)} sync PUT(s) claimed first)",
                timer.elapsed_ms,
            )
            log.log_action_with_timing(
                parent.id, LogAction.CANCELLATION_COMPLETED, "cancellation completed"
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

    def result_of(self, operation_id: uuid.UUID) -> CancellationResult:
        """The CancellationResult of a cancelled operation, read back from the database."""
        with self._database.transaction() as session:
            return cancellation_result(session, load_operation(session, operation_id))


def _list_rollback(operation: PendingStockOperation, adjustment_id: uuid.UUID) -> None:
    """List a new rollback adjustment among ``operation``'s (what its result reports)."""
    operation.rollback_operations = [*(operation.rollback_operations or []), str(adjustment_id)]


def _cancellable(session: Session, operation_id: uuid.UUID) -> PendingStockOperation:
    """The order deduction ``operation_id``, locked, when a cancel may act on it (CANCELLED
    already: the cancel returns its first result); refused for an adjustment or a FAILED
    operation."""
    operation = load_operation(session, operation_id, for_update=True)
    if operation.type_enum is not OperationType.ORDER_DEDUCTION:
        raise CancellationRefused(operation_id, f"an adjustment ({operation.operation_type})")
    if operation.status_enum is S.FAILED:
        raise CancellationRefused(operation_id, operation.status)
    return operation


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


@dataclass(frozen=True)
class _RollbackPlan:
    """A microservice rollback to run: the sync PUTs to claim, then the status to put back."""

    adjustment_id: uuid.UUID
    parent_id: uuid.UUID
    order_id: str
    target: str  # the fulfillment status recorded before the sync
    claims: tuple[RecordedPut, ...]


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


def _describe(action: _RollbackAction, target: str, order: MicroserviceOrder) -> str:
    found = order.fulfillment_status
    return {
        _RollbackAction.PUT_BACK: f"fulfillment put back to {target}",
        _RollbackAction.NOTHING: f"fulfillment already at {target}",
        _RollbackAction.MOVED_ON: f"fulfillment left at {found}: the seller moved it on",
        _RollbackAction.CANCELLED_UPSTREAM: "order cancelled upstream: fulfillment left as is",
    }[action]

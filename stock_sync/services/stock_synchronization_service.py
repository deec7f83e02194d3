"""StockSynchronizationService: the work of each pipeline stage, and its retry bookkeeping.

Every stage has the same shape: a short transaction reads (and locks) the operation row and
checks the stage still applies; the HTTP call, if any, happens with no transaction open; a
second short transaction re-checks the row under its lock, applies the change, transitions
and writes its audit events. Nothing here knows about Celery: a stage returns a
:class:`StageResult` and the task turns ``retry_in_s`` into ``Task.retry``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from stock_sync.adapters.db import Database, after_commit
from stock_sync.adapters.error_reporting import NO_ERROR_REPORTER, ErrorReporter, FailedOperation
from stock_sync.adapters.marketplace_contract import MicroserviceOrder
from stock_sync.adapters.microservice_client import MicroserviceClient
from stock_sync.adapters.models import PendingStockOperation, read_database_now, utcnow
from stock_sync.adapters.notifications import Notification, Notifier
from stock_sync.adapters.operation_events import DeferredEvents
from stock_sync.adapters.operation_rows import (
    OperationRow,
    change_row,
    lock_for_next_link,
    lock_row,
    move_row,
    move_row_if_still,
    peek_row,
    start_attempt,
)
from stock_sync.adapters.settings import Settings
from stock_sync.adapters.stock_ledger import deduct_for_operation, get_levels
from stock_sync.domain.errors import (
    InvalidInput,
    OperationNotFound,
    OrderNotReady,
    RevisionConflict,
    StockSyncError,
)
from stock_sync.domain.idempotency import RecordedPut
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.marketplace import AT_OR_PAST_SYNC, SYNCED_FULFILLMENT_STATUS
from stock_sync.domain.revisions import Revision, revision_from_text, revision_to_text
from stock_sync.domain.stages import (
    DEDUCT_STOCK,
    LOAD_LINE_ITEMS,
    ROLLBACK,
    SYNC_MICROSERVICE,
    VALIDATE_STOCK,
    Stage,
    StageOutcome,
    stage_outcome_for,
)
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.domain.stock import LineItem, ValidationResult, validate_stock_levels
from stock_sync.services.operation_cancellation_service import (
    MARKETPLACE,
    OperationCancellationService,
)
from stock_sync.services.operations import (
    line_items_of,
    lock_operation,
    operation_logger,
    retries_used,
    set_retries_used,
    transition,
)
from stock_sync.services.standardized_logger import (
    StandardizedLogger,
    Timer,
    measure_execution_time,
)

S = OperationStatus
NOT_PAID_YET = ("BOUGHT", "FILLED_IN")
stage_logger = logging.getLogger("stock_sync.stages")


@dataclass(frozen=True)
class StageResult:
    """What a stage did; ``retry_in_s`` asks the caller to run the stage again later."""

    outcome: StageOutcome
    retry_in_s: float | None = None

    @property
    def continues_chain(self) -> bool:
        return self.retry_in_s is None and self.outcome.continues_chain


class StockSynchronizationService:
    """Stage logic of the order pipeline; collaborators are passed in (see composition)."""

    def __init__(
        self,
        *,
        database: Database,
        client: MicroserviceClient,
        logger: StandardizedLogger,
        notifier: Notifier,
        settings: Settings,
        cancellation: OperationCancellationService,
        error_reporter: ErrorReporter = NO_ERROR_REPORTER,
    ) -> None:
        self._database = database
        self._error_reporter = error_reporter
        self._client = client
        self._logger = logger
        self._notifier = notifier
        self._settings = settings
        self._cancellation = cancellation
        self._stages: dict[str, Callable[[uuid.UUID, int | None], StageOutcome]] = {
            LOAD_LINE_ITEMS.name: self.load_line_items,
            VALIDATE_STOCK.name: self.validate_stock,
            DEDUCT_STOCK.name: self.deduct_stock,
            SYNC_MICROSERVICE.name: self.sync_microservice,
            ROLLBACK.name: cancellation.rollback_microservice,
        }

    # --- entry point for the tasks --------------------------------------------------------

    def execute(
        self, stage: Stage, operation_id: uuid.UUID, generation: int | None = None
    ) -> StageResult:
        """Run one stage; a failure becomes a scheduled retry or, past the limit, FAILED.

        ``generation``: the dispatch the message belongs to (None for a message that carries
        none); a copy of an older dispatch is dropped at once (see services.stuck)."""
        try:
            return StageResult(self._stages[stage.name](operation_id, generation))
        except _CancelledMeanwhile:
            return StageResult(StageOutcome.STOPPED)
        except OperationNotFound:
            stage_logger.error(
                "stage %s: operation not found",
                stage.name,
                extra={"operation_id": str(operation_id)},
            )
            return StageResult(StageOutcome.STOPPED)
        except StockSyncError as error:
            if not error.retryable:
                self.fail_operation(operation_id, stage, error)
                return StageResult(StageOutcome.STOPPED)
            return self.record_retry(operation_id, stage, error)
        except Exception as error:  # an unexpected fault: retried, so a bug ends FAILED, not lost
            stage_logger.exception(
                "unexpected error in stage %s",
                stage.name,
                extra={"operation_id": str(operation_id)},
            )
            return self.record_retry(operation_id, stage, error)

    # --- stage 1: PENDING -> PROCESSING ------------------------------------------------------

    def load_line_items(
        self, operation_id: uuid.UUID, generation: int | None = None
    ) -> StageOutcome:
        """Load the order's lines from the microservice once it is paid.

        Whether the stage applies is checked by the statement that stamps the attempt's
        start; the lines are stored with one UPDATE guarded by the status read (it takes the
        row lock), in the transaction that also writes the stage's events, "loading" included.
        """
        found = self._start(operation_id, LOAD_LINE_ITEMS, generation)
        if isinstance(found, StageOutcome):
            return found
        order_id = found.order_id
        loading = DeferredEvents()
        log = self._logger.with_events(loading)
        _bind(log, found)
        log.log_action_with_timing(
            operation_id, LogAction.LINE_ITEMS_LOADING, f"loading order {order_id}"
        )
        with self._measure_execution_time() as timer:
            order = self._client.get_order(order_id)
        if order.status == "CANCELLED":
            self._cancellation.cancel_operation(
                operation_id, cancelled_by=MARKETPLACE, reason="order cancelled upstream"
            )
            return StageOutcome.STOPPED
        if order.status in NOT_PAID_YET:
            raise OrderNotReady(order_id, order.status)
        if not order.line_items:
            raise InvalidInput(f"order {order_id} has no line items")
        return self._store_line_items(found, order, timer, loading)

    def _store_line_items(
        self,
        found: OperationRow,
        order: MicroserviceOrder,
        timer: Timer,
        loading: DeferredEvents,
    ) -> StageOutcome:
        fills_account = not found.account_name and bool(order.account_name)

        def log_loaded() -> None:
            loading.write_into(connection)
            if fills_account:
                log.log_action_with_timing(
                    found.id,
                    LogAction.ACCOUNT_NAME_UPDATED,
                    f"account name set to {order.account_name}",
                )
            log.log_action_with_timing(
                found.id,
                LogAction.LINE_ITEMS_LOADED,
                f"{len(order.line_items)} line items loaded",
                timer.elapsed_ms,
            )

        with self._database.core_transaction() as connection:
            log = operation_logger(connection, found, self._logger)
            stored = move_row_if_still(
                connection,
                found,
                S.PROCESSING,
                "line items loaded",
                log,
                log_outcome=log_loaded,
                line_items=[
                    LineItem(line.id, line.offer_id, line.sku, line.quantity).to_dict()
                    for line in order.line_items
                ],
                # What the sync PUT sends as expected_revision, and what a rollback restores.
                order_revision=revision_to_text(order.revision),
                fulfillment_status_before_sync=order.fulfillment_status,
                **({"account_name": order.account_name} if fills_account else {}),
            )
        if not stored:  # a cancel (or a duplicate delivery) got there first
            return self._verdict_now(found.id, LOAD_LINE_ITEMS)
        return StageOutcome.DONE

    # --- stage 2: PROCESSING, validation -------------------------------------------------

    def validate_stock(
        self, operation_id: uuid.UUID, generation: int | None = None
    ) -> StageOutcome:
        """Check every SKU exists and has enough stock; advisory, the deduction decides.

        One statement checks the stage applies, locks the row and stamps the dispatch of
        deduct_stock's message (published once this commits; a failed validation rolls it
        back)."""
        with self._database.core_transaction() as connection:
            operation = lock_for_next_link(connection, operation_id, S.PROCESSING, generation)
            if operation is None:
                skipped = self._peek(operation_id, VALIDATE_STOCK, generation)
                return skipped if isinstance(skipped, StageOutcome) else StageOutcome.STOPPED
            log = operation_logger(connection, operation, self._logger)
            with self._measure_execution_time() as timer:
                log.log_action_with_timing(
                    operation_id, LogAction.STOCK_VALIDATION_STARTED, "validating stock"
                )
                lines = line_items_of(operation)
                result = validate_stock_levels(
                    lines, get_levels(connection, (line.sku for line in lines))
                )
            if not result.ok:
                raise result.to_error()
            log.log_action_with_timing(
                operation_id,
                LogAction.STOCK_VALIDATION_PASSED,
                f"{len(lines)} lines can be served",
                timer.elapsed_ms,
            )
            return StageOutcome.DONE

    # --- stage 3: PROCESSING -> STOCK_DEDUCTED -------------------------------------------

    def deduct_stock(self, operation_id: uuid.UUID, generation: int | None = None) -> StageOutcome:
        """Take the lines out of stock in one short transaction (authoritative)."""
        with self._stage_transaction(operation_id, DEDUCT_STOCK, generation) as stage:
            if stage.skip:
                return stage.skip
            operation, log = stage.operation, stage.log
            log.log_action_with_timing(
                operation_id, LogAction.STOCK_DEDUCTION_STARTED, "deducting stock"
            )
            with self._measure_execution_time() as timer:
                # PROCESSING under the row lock proves nothing was deducted yet: the deduction
                # commits with the move to STOCK_DEDUCTED (the ledger's unique key backs it up).
                outcome = deduct_for_operation(
                    stage.connection,
                    operation_id,
                    line_items_of(operation),
                    known_not_deducted=True,
                )
            log.log_action_with_timing(
                operation_id,
                LogAction.STOCK_DEDUCTION_COMPLETED,
                ", ".join(f"{m.sku} {m.delta}" for m in outcome.movements),
                timer.elapsed_ms,
            )
            # From here on a sync PUT may leave at any moment: a cancellation must then roll
            # the marketplace back (see sync_microservice), claiming this PUT's key first.
            move_row(
                stage.connection,
                operation,
                S.STOCK_DEDUCTED,
                "stock deducted",
                log,
                sync_put_sent_at=utcnow(),
                sync_puts=_first_sync_put(operation),
            )
            return StageOutcome.DONE

    # --- stage 4: STOCK_DEDUCTED -> COMPLETED --------------------------------------------

    def sync_microservice(
        self, operation_id: uuid.UUID, generation: int | None = None
    ) -> StageOutcome:
        """Tell the microservice the stock is taken (fulfillment PROCESSING) with one PUT.

        The revision was recorded at load and the PUT (its key and body) by the deduction,
        before it can leave; so a cancellation from STOCK_DEDUCTED or later rolls the
        marketplace back whatever happens to this PUT, claiming its key first (see
        OperationCancellationService.rollback_microservice). The order is read again only
        after a 409 revision conflict (a buyer's edit, an order cancelled upstream): the new
        revision is a new payload, so it is recorded with a key of its own before it leaves.
        """
        found = self._start(operation_id, SYNC_MICROSERVICE, generation)
        if isinstance(found, StageOutcome):
            return found
        started = DeferredEvents()
        log = self._logger.with_events(started)
        _bind(log, found)
        log.log_action_with_timing(
            operation_id, LogAction.MICROSERVICE_SYNC_STARTED, "syncing fulfillment status"
        )
        request: SyncRequest | _SyncStop | None = _sync_request(found)
        with self._measure_execution_time() as timer:
            if request is None:  # a row deducted before the PUTs were recorded
                request = self._reload_for_sync(operation_id, generation)
            try:
                if isinstance(request, SyncRequest):
                    self._send_sync_put(request)
            except RevisionConflict:
                request = self._reload_for_sync(operation_id, generation)
                if isinstance(request, SyncRequest):
                    self._send_sync_put(request)  # a second 409 is retried with backoff
        if request is None or request is _SyncStop.STOPPED:
            return StageOutcome.STOPPED
        return self._complete(found, timer, started, request)

    def _send_sync_put(self, request: SyncRequest) -> None:
        """The PUT; when it may have landed although it failed, a cancellation that won
        meanwhile is made to roll it back, and the stage stops."""
        try:
            self._client.set_fulfillment_status(
                request.order_id,
                status=SYNCED_FULFILLMENT_STATUS,
                expected_revision=request.revision,
                idempotency_key=request.key,
            )
        except Exception as error:
            if getattr(error, "may_have_taken_effect", True) and (
                self._cancellation.compensate_if_cancelled(request.operation_id)
            ):
                raise _CancelledMeanwhile() from error
            raise

    def _reload_for_sync(
        self, operation_id: uuid.UUID, generation: int | None
    ) -> SyncRequest | _SyncStop | None:
        """GET the order (after a 409) and decide the next PUT; None when the operation left
        STOCK_DEDUCTED meanwhile.

        - CANCELLED upstream (the buyer cancelled): the operation is cancelled by
          ``marketplace``, its stock restored, and no PUT is sent: STOPPED.
        - the fulfillment at or past the sync's status (one of our PUTs landed, or the seller
          moved on): nothing to send: ALREADY_SYNCED.
        - otherwise the next PUT, with the new revision under a key of its own, recorded
          before it leaves. The recorded revision only moves forward: each read takes a
          ticket first, and a read that a newer one started after records nothing (the PUT
          then is the newer one's).
        """
        with self._stage_transaction(operation_id, SYNC_MICROSERVICE, generation) as stage:
            if stage.skip:
                return None
            ticket = stage.operation.revision_reads + 1
            change_row(stage.connection, stage.operation, revision_reads=ticket)
            order_id = stage.operation.order_id
        order = self._client.get_order(order_id)
        if order.status == "CANCELLED":
            self._cancellation.cancel_operation(
                operation_id,
                cancelled_by=MARKETPLACE,
                reason="order cancelled upstream (seen by the sync)",
            )
            return _SyncStop.STOPPED
        with self._stage_transaction(operation_id, SYNC_MICROSERVICE, generation) as stage:
            if stage.skip:
                return None
            operation = stage.operation
            if operation.revision_reads == ticket:  # no newer read started meanwhile
                revision = revision_to_text(order.revision)
                put = RecordedPut.for_sync(operation.id, revision)
                recorded = [RecordedPut.from_dict(raw) for raw in operation.sync_puts or []]
                change_row(
                    stage.connection,
                    operation,
                    order_revision=revision,
                    fulfillment_status_before_sync=(
                        operation.fulfillment_status_before_sync or order.fulfillment_status
                    ),
                    sync_put_sent_at=operation.sync_put_sent_at or utcnow(),
                    sync_puts=[p.to_dict() for p in recorded if p != put] + [put.to_dict()],
                )
                if order.fulfillment_status in AT_OR_PAST_SYNC:
                    return _SyncStop.ALREADY_SYNCED
            return _sync_request(operation)

    def resync(self, operation_id: uuid.UUID, order: MicroserviceOrder, reason: str) -> bool:
        """Send the sync PUT again for a COMPLETED operation whose order, read just now as
        ``order``, is back at the status before the sync (the marketplace audit's repair):
        the order's current revision is a new payload, so its key is recorded first (a later
        cancellation claims it), then the PUT leaves, with its audit events. False (nothing
        sent) when the operation is no longer COMPLETED; raises what the PUT raises."""
        revision = revision_to_text(order.revision)
        put = RecordedPut.for_sync(operation_id, revision)
        with self._database.core_transaction() as connection:
            operation = lock_row(connection, operation_id)
            if operation.status_enum is not S.COMPLETED:
                return False
            recorded = [RecordedPut.from_dict(raw) for raw in operation.sync_puts or []]
            change_row(
                connection,
                operation,
                sync_puts=[p.to_dict() for p in recorded if p != put] + [put.to_dict()],
            )
            log = operation_logger(connection, operation, self._logger)
            log.log_action_with_timing(
                operation_id, LogAction.MICROSERVICE_SYNC_STARTED, f"syncing again: {reason}"
            )
        with self._measure_execution_time() as timer:
            self._client.set_fulfillment_status(
                order.id,
                status=SYNCED_FULFILLMENT_STATUS,
                expected_revision=order.revision,
                idempotency_key=put.key,
            )
        with self._database.core_transaction() as connection:
            operation = peek_row(connection, operation_id)
            operation_logger(connection, operation, self._logger).log_action_with_timing(
                operation_id,
                LogAction.MICROSERVICE_SYNC_SUCCESS,
                f"fulfillment set to {SYNCED_FULFILLMENT_STATUS} again ({reason})",
                timer.elapsed_ms,
            )
        return True

    def _complete(
        self,
        found: OperationRow,
        timer: Timer,
        started: DeferredEvents,
        request: SyncRequest | _SyncStop,
    ) -> StageOutcome:
        already = request is _SyncStop.ALREADY_SYNCED

        def log_synced() -> None:
            started.write_into(connection)
            log.log_action_with_timing(
                found.id,
                LogAction.MICROSERVICE_SYNC_SUCCESS,
                f"fulfillment already at or past {SYNCED_FULFILLMENT_STATUS}: no PUT needed"
                if already
                else f"fulfillment set to {SYNCED_FULFILLMENT_STATUS}",
                timer.elapsed_ms,
            )

        with self._database.core_transaction() as connection:
            log = operation_logger(connection, found, self._logger)
            completed = move_row_if_still(
                connection,
                found,
                S.COMPLETED,
                "status synced to the microservice",
                log,
                log_outcome=log_synced,
                microservice_synced_at=utcnow(),
            )
        if completed:
            return StageOutcome.DONE
        if self._cancellation.compensate_if_cancelled(found.id, put_landed=True):
            # Our PUT landed after a cancellation: a rollback must read the order after it.
            return StageOutcome.STOPPED
        return StageOutcome.ALREADY_PAST  # a duplicate delivery finished first

    # --- retries and failure ---------------------------------------------------------------

    def record_retry(self, operation_id: uuid.UUID, stage: Stage, error: Exception) -> StageResult:
        """Count a retry of ``stage`` in the row (the truth), or fail the operation past the
        stage's limit. Notifications leave after the commit.

        A short wait is a countdown message (``retry_in_s``); a wait longer than
        ``retry_park_after_s`` is *parked* in the row (``next_retry_at``, no message), so a
        worker holds nothing in memory for it: beat re-enqueues it when it is due."""
        with self._database.transaction() as session:
            operation = lock_operation(session, operation_id)
            if operation.status_enum is not stage.status:
                return StageResult(StageOutcome.STOPPED)  # cancelled or moved on meanwhile
            log = operation_logger(session, operation, self._logger)
            policy = self._settings.retry_policy(stage.retry_budget)
            used = retries_used(operation, stage)
            if policy.exhausted(used):
                self._log_failure(session, log, operation, stage, error, next_retry_at=None)
                log.log_action_with_timing(
                    operation_id,
                    LogAction.MAX_RETRIES_REACHED,
                    f"stage {stage.name} gave up after {used} retries",
                    status="error",
                )
                self._fail(
                    session, operation, log, error, f"retry limit of {stage.name} reached", stage
                )
                return StageResult(StageOutcome.STOPPED)
            used += 1
            set_retries_used(operation, stage, used)
            delay = policy.delay_for(used, at_least_s=getattr(error, "retry_after_s", None))
            parked = delay > self._settings.retry_park_after_s
            now = read_database_now(session.connection())
            operation.next_retry_at = now + timedelta(seconds=delay)
            # parked: no message exists until beat releases it; otherwise the countdown copy
            # is published right after this commits
            operation.dispatched_at = None if parked else now
            operation.attempt_started_at = None
            operation.last_error = _one_line(error)
            operation.last_error_type = type(error).__name__
            operation.updated_at = utcnow()
            log.bind(
                operation_id,
                order_id=operation.order_id,
                status=operation.status,
                attempt=used,
                next_retry_at=operation.next_retry_at,
                max_retries=policy.max_retries,
                stage=stage.name,
            )
            self._log_failure(
                session, log, operation, stage, error, next_retry_at=operation.next_retry_at
            )
            waits = "waits in the database" if parked else "in"
            log.log_action_with_timing(
                operation_id,
                LogAction.RETRY_SCHEDULED,
                f"retry {used} of {policy.max_retries} of {stage.name} {waits} {delay:.3f}s",
                status="warning",
            )
            if parked:
                return StageResult(StageOutcome.STOPPED)
            return StageResult(StageOutcome.STOPPED, retry_in_s=delay)

    def fail_operation(self, operation_id: uuid.UUID, stage: Stage, error: Exception) -> None:
        """A permanent error: the operation goes to FAILED at once, if still in the stage."""
        with self._database.transaction() as session:
            operation = lock_operation(session, operation_id)
            if operation.status_enum is not stage.status:
                return
            log = operation_logger(session, operation, self._logger)
            self._log_failure(session, log, operation, stage, error, next_retry_at=None)
            self._fail(session, operation, log, error, f"permanent error in {stage.name}", stage)

    def fail_exhausted(self, operation_id: uuid.UUID, stage: Stage) -> bool:
        """FAILED for an operation whose stage kept dying past its budget (a killed worker, a
        hard time limit) with no stage left to fail it; False when it moved on meanwhile."""
        with self._database.transaction() as session:
            operation = lock_operation(session, operation_id)
            if operation.status_enum is not stage.status:
                return False
            policy = self._settings.retry_policy(stage.retry_budget)
            log = operation_logger(session, operation, self._logger)
            log.log_action_with_timing(
                operation_id,
                LogAction.MAX_RETRIES_REACHED,
                f"stage {stage.name} used its {policy.max_retries} retries and its last run "
                "was lost too (found by the sweep)",
                status="error",
            )
            error = StockSyncError(operation.last_error or "retry limit reached")
            self._fail(
                session,
                operation,
                log,
                error,
                f"retry limit of {stage.name} reached",
                stage,
                error_type=operation.last_error_type,
            )
            return True

    def _fail(
        self,
        session: Session,
        operation: PendingStockOperation,
        log: StandardizedLogger,
        error: Exception,
        reason: str,
        stage: Stage,
        *,
        error_type: str | None = None,
    ) -> None:
        """FAILED in ``stage`` with ``error``; ``error_type`` names the error's type when
        ``error`` only carries the message of one recorded earlier (the sweep failing a dead
        stage)."""
        error_type = error_type or type(error).__name__
        operation.last_error = _one_line(error)
        operation.last_error_type = error_type
        operation.failed_stage = stage.name
        log.log_action_with_timing(
            operation.id,
            LogAction.OPERATION_FAILED,
            f"{reason}: {_one_line(error)}",
            status="error",
        )
        kept = " (stock stays deducted)" if operation.status_enum is S.STOCK_DEDUCTED else ""
        transition(operation, S.FAILED, reason + kept, log)
        if operation.type_enum is OperationType.MICROSERVICE_ROLLBACK:
            self._cancellation.report_rollback_failed(session, operation)
        self._notify_after_commit(
            session,
            Notification(
                kind="operation_failed",
                operation_id=operation.id,
                order_id=operation.order_id,
                message=f"operation failed: {reason}{kept}",
                details={"error_type": error_type, "error": _one_line(error)},
            ),
        )
        failure = FailedOperation(
            operation.id, operation.order_id, stage.name, error_type, _one_line(error), reason
        )
        after_commit(session, lambda: self._error_reporter.operation_failed(failure))

    def _log_failure(
        self,
        session: Session,
        log: StandardizedLogger,
        operation: PendingStockOperation,
        stage: Stage,
        error: Exception,
        *,
        next_retry_at: Any,
    ) -> None:
        result = getattr(error, "validation_result", None)
        if stage is VALIDATE_STOCK and isinstance(result, ValidationResult):
            log.log_validation_failure(operation.id, result)
            self._notify_after_commit(
                session,
                Notification(
                    kind="stock_validation_failed",
                    operation_id=operation.id,
                    order_id=operation.order_id,
                    message=str(error),
                    details={"next_retry_at": str(next_retry_at) if next_retry_at else None},
                ),
            )
            return
        log.log_error_with_context(
            operation.id,
            error,
            {"action": stage.failure_action, "stage": stage.name, "next_retry_at": next_retry_at},
        )

    # --- plumbing ------------------------------------------------------------------------

    def _notify_after_commit(self, session: Session, notification: Notification) -> None:
        """Senders are e-mail or chat (network calls): never inside the transaction, and never
        for a change that rolled back."""
        after_commit(session, lambda: self._notifier.notify(notification))

    @contextmanager
    def _stage_transaction(
        self, operation_id: uuid.UUID, stage: Stage, generation: int | None = None
    ) -> Iterator[StageContext]:
        """A transaction holding the locked operation row, with the verdict on whether
        ``stage`` still applies (None: go ahead; otherwise the outcome to return at once).

        The row lock serialises every stage step with a concurrent cancellation, so neither
        acts on a status the other is changing and the audit trail never interleaves.
        """
        with self._database.core_transaction() as connection:
            operation = lock_row(connection, operation_id)
            verdict = _verdict(operation, stage, generation)
            yield StageContext(
                connection,
                operation,
                operation_logger(connection, operation, self._logger),
                verdict,
            )

    def _start(
        self, operation_id: uuid.UUID, stage: Stage, generation: int | None
    ) -> OperationRow | StageOutcome:
        """Stamp the start of a network stage's attempt and return the row, or the outcome to
        return when ``stage`` does not apply (a duplicate delivery, a stale copy of an older
        dispatch, a chain ahead of its operation, a cancel)."""
        with self._database.single_statement() as connection:
            started = start_attempt(connection, operation_id, stage.status, generation)
        if started is not None:
            return started
        found = self._peek(operation_id, stage, generation)
        return found if isinstance(found, StageOutcome) else StageOutcome.STOPPED

    def _peek(
        self, operation_id: uuid.UUID, stage: Stage, generation: int | None = None
    ) -> OperationRow | StageOutcome:
        """The operation read without a lock, or the outcome to return when ``stage`` does
        not apply to it (a duplicate delivery, a stale copy, a chain ahead of its operation,
        a cancel)."""
        with self._database.peek() as connection:
            found = peek_row(connection, operation_id)
        verdict = _verdict(found, stage, generation)
        return found if verdict is None else verdict

    def _verdict_now(self, operation_id: uuid.UUID, stage: Stage) -> StageOutcome:
        """Why ``stage`` no longer applies, read again after a guarded move found the status
        changed (the operation moved on or was cancelled meanwhile)."""
        found = self._peek(operation_id, stage)
        return found if isinstance(found, StageOutcome) else StageOutcome.STOPPED

    @staticmethod
    def _measure_execution_time() -> AbstractContextManager[Timer]:
        return measure_execution_time()


@dataclass(frozen=True)
class SyncRequest:
    """One sync PUT, as recorded on the row before it leaves: its key names its payload."""

    operation_id: uuid.UUID
    order_id: str
    revision: Revision
    key: str


class _SyncStop(Enum):
    """Why a reload sends no PUT."""

    STOPPED = "stopped"  # cancelled upstream: the operation was cancelled, the stage stops
    ALREADY_SYNCED = "already_synced"  # the fulfillment is at or past the sync's status


def _first_sync_put(operation: OperationRow) -> list[dict[str, str]] | None:
    """The deduction's record of the first sync PUT (the revision read at load)."""
    if operation.order_revision is None:
        return None
    return [RecordedPut.for_sync(operation.id, operation.order_revision).to_dict()]


def _sync_request(operation: OperationRow) -> SyncRequest | None:
    """The PUT to send: the last one recorded. None when the order must be read first (a row
    deducted before the PUTs were recorded)."""
    if not operation.sync_puts or operation.fulfillment_status_before_sync is None:
        return None
    put = RecordedPut.from_dict(operation.sync_puts[-1])
    return SyncRequest(
        operation.id, operation.order_id, revision_from_text(put.expected_revision), put.key
    )


def _bind(log: StandardizedLogger, operation: OperationRow) -> None:
    log.bind(
        operation.id,
        order_id=operation.order_id,
        status=operation.status,
        attempt=operation.retry_count + 1,
        operation_type=operation.operation_type,
    )


class _CancelledMeanwhile(Exception):
    """Internal: a failed sync PUT found its operation cancelled and handed it to a rollback."""


@dataclass(frozen=True)
class StageContext:
    connection: Connection  # Core statements on the hot path, no Session
    operation: OperationRow
    log: StandardizedLogger
    skip: StageOutcome | None


def _verdict(row: OperationRow, stage: Stage, generation: int | None) -> StageOutcome | None:
    """None when ``stage`` applies to ``row`` for a message of dispatch ``generation``;
    otherwise the outcome to return at once, logged. A copy of an older dispatch stops its
    chain whatever the status: the newer dispatch drives the operation."""
    if generation is not None and row.dispatch_generation != generation:
        stage_logger.info(
            "stage %s skipped: a copy of dispatch %d, the operation is at dispatch %d",
            stage.name,
            generation,
            row.dispatch_generation,
            extra={
                "operation_id": str(row.id),
                "order_id": row.order_id,
                "status": row.status,
                "stage": stage.name,
                "chain": "stops",
            },
        )
        return StageOutcome.STOPPED
    verdict = stage_outcome_for(row.status_enum, stage)
    if verdict is not None:
        _log_skip(row.id, row.order_id, row.status, stage, verdict)
    return verdict


def _log_skip(
    operation_id: uuid.UUID, order_id: str, status: str, stage: Stage, verdict: StageOutcome
) -> None:
    stage_logger.info(
        "stage %s skipped: operation is %s",
        stage.name,
        status,
        extra={
            "operation_id": str(operation_id),
            "order_id": order_id,
            "status": status,
            "stage": stage.name,
            "chain": "continues" if verdict.continues_chain else "stops",
        },
    )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().replace("\n", " ")
    return text[:500] if text else type(error).__name__

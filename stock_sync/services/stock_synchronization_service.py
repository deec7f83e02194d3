"""StockSynchronizationService: the work of each pipeline stage.

Its stages are registered with the StageRunner (stage_runner.py), which runs them and keeps
their retry bookkeeping; StageGate (stage_gate.py) says whether a stage still applies. Every
stage has the same shape: a short transaction reads (and locks) the operation row and
checks the stage still applies; the HTTP call, if any, happens with no transaction open; a
second short transaction re-checks the row under its lock, applies the change, transitions
and writes its audit events. Nothing here knows about Celery.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from stock_sync.adapters.db import Database
from stock_sync.adapters.marketplace_contract import MicroserviceOrder
from stock_sync.adapters.microservice_client import MicroserviceClient
from stock_sync.adapters.models import utcnow
from stock_sync.adapters.operation_events import DeferredEvents
from stock_sync.adapters.operation_rows import (
    OperationRow,
    change_row,
    lock_for_next_link,
    lock_row,
    move_row,
    move_row_if_still,
    peek_row,
)
from stock_sync.adapters.stock_ledger import deduct_for_operation, get_levels
from stock_sync.domain.errors import InvalidInput, OrderNotReady, RevisionConflict
from stock_sync.domain.idempotency import RecordedPut
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.marketplace import AT_OR_PAST_SYNC, SYNCED_FULFILLMENT_STATUS
from stock_sync.domain.revisions import Revision, revision_from_text, revision_to_text
from stock_sync.domain.stages import (
    DEDUCT_STOCK,
    LOAD_LINE_ITEMS,
    SYNC_MICROSERVICE,
    VALIDATE_STOCK,
    Stage,
    StageOutcome,
)
from stock_sync.domain.statuses import OperationStatus
from stock_sync.domain.stock import LineItem, validate_stock_levels
from stock_sync.services.operation_cancellation_service import (
    MARKETPLACE,
    OperationCancellationService,
)
from stock_sync.services.operations import bind_operation, line_items_of, operation_logger
from stock_sync.services.stage_gate import StageGate
from stock_sync.services.stage_runner import StageResult, StageRunner, StageStopped
from stock_sync.services.standardized_logger import (
    StandardizedLogger,
    Timer,
    measure_execution_time,
)

S = OperationStatus
NOT_PAID_YET = ("BOUGHT", "FILLED_IN")


class StockSynchronizationService:
    """Stage logic of the order pipeline; collaborators are passed in (see composition)."""

    def __init__(
        self,
        *,
        database: Database,
        client: MicroserviceClient,
        logger: StandardizedLogger,
        runner: StageRunner,
        cancellation: OperationCancellationService,
    ) -> None:
        self._database = database
        self._client = client
        self._logger = logger
        self._runner = runner
        self._notifier = runner.notifier  # where its failures are told (tests read it)
        self._cancellation = cancellation
        self._gate = StageGate(database, logger)
        for stage, body in (
            (LOAD_LINE_ITEMS, self.load_line_items),
            (VALIDATE_STOCK, self.validate_stock),
            (DEDUCT_STOCK, self.deduct_stock),
            (SYNC_MICROSERVICE, self.sync_microservice),
        ):
            runner.register(stage, body)

    # --- entry points for the tasks and the sweep (the runner does the work) ----------------

    def execute(
        self, stage: Stage, operation_id: uuid.UUID, generation: int | None = None
    ) -> StageResult:
        """Run one stage (the pipeline's or the rollback); see StageRunner.execute."""
        return self._runner.execute(stage, operation_id, generation)

    def fail_operation(self, operation_id: uuid.UUID, stage: Stage, error: Exception) -> None:
        """A permanent error: the operation goes to FAILED at once, if still in the stage."""
        self._runner.fail_operation(operation_id, stage, error)

    def fail_exhausted(self, operation_id: uuid.UUID, stage: Stage) -> bool:
        """FAILED for an operation whose stage kept dying past its budget; False when it
        moved on meanwhile (see StageRunner.fail_exhausted)."""
        return self._runner.fail_exhausted(operation_id, stage)

    # --- stage 1: PENDING -> PROCESSING ------------------------------------------------------

    def load_line_items(
        self, operation_id: uuid.UUID, generation: int | None = None
    ) -> StageOutcome:
        """Load the order's lines from the microservice once it is paid.

        Whether the stage applies is checked by the statement that stamps the attempt's
        start; the lines are stored with one UPDATE guarded by the status read (it takes the
        row lock), in the transaction that also writes the stage's events, "loading" included.
        """
        found = self._gate.start(operation_id, LOAD_LINE_ITEMS, generation)
        if isinstance(found, StageOutcome):
            return found
        order_id = found.order_id
        loading = DeferredEvents()
        log = self._logger.with_events(loading)
        bind_operation(log, found)
        log.log_action_with_timing(
            operation_id, LogAction.LINE_ITEMS_LOADING, f"loading order {order_id}"
        )
        with measure_execution_time() as timer:
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

        def log_loaded(log: StandardizedLogger) -> None:
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

        stored = self._move_if_still(
            found,
            S.PROCESSING,
            "line items loaded",
            loading,
            log_loaded,
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
            return self._gate.verdict_now(found.id, LOAD_LINE_ITEMS)
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
                return self._gate.verdict_now(operation_id, VALIDATE_STOCK, generation)
            log = operation_logger(connection, operation, self._logger)
            with measure_execution_time() as timer:
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
        with self._gate.stage_transaction(operation_id, DEDUCT_STOCK, generation) as stage:
            if stage.skip:
                return stage.skip
            operation, log = stage.operation, stage.log
            log.log_action_with_timing(
                operation_id, LogAction.STOCK_DEDUCTION_STARTED, "deducting stock"
            )
            with measure_execution_time() as timer:
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
        found = self._gate.start(operation_id, SYNC_MICROSERVICE, generation)
        if isinstance(found, StageOutcome):
            return found
        started = DeferredEvents()
        log = self._logger.with_events(started)
        bind_operation(log, found)
        log.log_action_with_timing(
            operation_id, LogAction.MICROSERVICE_SYNC_STARTED, "syncing fulfillment status"
        )
        request: SyncRequest | _SyncStop | None = _sync_request(found)
        with measure_execution_time() as timer:
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
                raise StageStopped() from error
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
        with self._gate.stage_transaction(operation_id, SYNC_MICROSERVICE, generation) as stage:
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
        with self._gate.stage_transaction(operation_id, SYNC_MICROSERVICE, generation) as stage:
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

    def _move_if_still(
        self,
        found: OperationRow,
        to_status: OperationStatus,
        reason: str,
        deferred: DeferredEvents,
        log_outcome: Callable[[StandardizedLogger], None],
        **values: Any,
    ) -> bool:
        """Finish a network stage: move ``found`` on from the status it was read in, with
        ``values``, writing the stage's ``deferred`` events then its outcome in the same
        transaction; False (nothing written) when the status moved meanwhile."""
        with self._database.core_transaction() as connection:
            log = operation_logger(connection, found, self._logger)

            def log_moved() -> None:
                deferred.write_into(connection)
                log_outcome(log)

            return move_row_if_still(
                connection, found, to_status, reason, log, log_outcome=log_moved, **values
            )

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
        with measure_execution_time() as timer:
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

        def log_synced(log: StandardizedLogger) -> None:
            log.log_action_with_timing(
                found.id,
                LogAction.MICROSERVICE_SYNC_SUCCESS,
                f"fulfillment already at or past {SYNCED_FULFILLMENT_STATUS}: no PUT needed"
                if already
                else f"fulfillment set to {SYNCED_FULFILLMENT_STATUS}",
                timer.elapsed_ms,
            )

        completed = self._move_if_still(
            found,
            S.COMPLETED,
            "status synced to the microservice",
            started,
            log_synced,
            microservice_synced_at=utcnow(),
        )
        if completed:
            return StageOutcome.DONE
        if self._cancellation.compensate_if_cancelled(found.id, put_landed=True):
            # Our PUT landed after a cancellation: a rollback must read the order after it.
            return StageOutcome.STOPPED
        return StageOutcome.ALREADY_PAST  # a duplicate delivery finished first


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

"""Recovery of FAILED operations: ``stock-sync retry`` and the producer's ``retry_operation``.

FAILED stays final (the seed's table). A retry gives the failed order deduction a *successor*:
a new order deduction of the same order, linked both ways, which the producer returns for that
order from then on and which can be cancelled like any other. It starts where the failed one
stopped:

- failed before its deduction (loading, validating, deducting): the successor starts PENDING
  and runs the whole pipeline, the order read afresh;
- failed after its deduction (the sync): the successor takes the deduction over in the ledger
  (a handover row and a deduction row of its own, no stock level changes: never a second
  deduction), moves PENDING -> PROCESSING -> STOCK_DEDUCTED in the same transaction with the
  failed one's line items, revision and pre-sync fulfillment status, and goes on to the sync.
  A cancellation of it restores the stock and rolls the marketplace back as for any other.

One transaction locks the failed row, checks it may be retried (an order deduction, FAILED,
not retried before), creates the successor and links both; a second retry of the same
operation finds it retried (and the unique predecessor key backs that up). The pipeline is
enqueued after the commit.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import PendingStockOperation, db_now, read_database_now, utcnow
from stock_sync.adapters.stock_ledger import hand_over_deduction, outstanding_deductions
from stock_sync.domain.errors import RetryRefused
from stock_sync.domain.idempotency import RecordedPut
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.services.dispatch import Dispatcher
from stock_sync.services.operations import (
    FIRST_DISPATCH,
    load_operation,
    new_order_deduction,
    operation_logger,
    transition,
)
from stock_sync.services.standardized_logger import StandardizedLogger

S = OperationStatus


@dataclass(frozen=True)
class RetryResult:
    """What a retry did, as the CLI and the shop backend report it."""

    failed_operation_id: uuid.UUID
    successor_operation_id: uuid.UUID
    order_id: str
    failed_stage: str | None
    starts_from: OperationStatus
    deduction_taken_over: bool
    enqueued: bool  # False: the broker refused; the sweep re-drives it

    def to_dict(self) -> dict[str, Any]:
        return {
            "failed_operation_id": str(self.failed_operation_id),
            "successor_operation_id": str(self.successor_operation_id),
            "order_id": self.order_id,
            "failed_stage": self.failed_stage,
            "starts_from": self.starts_from.value,
            "deduction_taken_over": self.deduction_taken_over,
            "enqueued": self.enqueued,
        }


class OperationRecoveryService:
    """Retries FAILED order deductions as successors (collaborators passed in)."""

    def __init__(
        self, *, database: Database, logger: StandardizedLogger, dispatcher: Dispatcher
    ) -> None:
        self._database = database
        self._logger = logger
        self._dispatcher = dispatcher

    def check_retryable(self, operation_id: uuid.UUID) -> None:
        """Raise OperationNotFound or RetryRefused unless ``operation_id`` may be retried now
        (a read: for checking every id of a command before anything is written)."""
        with self._database.transaction() as session:
            _refusal(load_operation(session, operation_id))

    def retry_operation(self, operation_id: uuid.UUID) -> RetryResult:
        """Give the FAILED order deduction ``operation_id`` a successor and enqueue it."""
        try:
            with self._database.transaction() as session:
                failed = load_operation(session, operation_id, for_update=True)
                _refusal(failed)
                successor, took_over = self._successor(session, failed)
                result = RetryResult(
                    failed.id,
                    successor.id,
                    failed.order_id,
                    failed.failed_stage,
                    successor.status_enum,
                    took_over,
                    enqueued=False,
                )
        except IntegrityError:  # the unique predecessor key: a concurrent retry won
            raise RetryRefused(operation_id, "it was retried already") from None
        try:
            self._dispatcher.enqueue_pipeline(
                result.successor_operation_id, result.starts_from, FIRST_DISPATCH
            )
        except Exception:
            return result
        return RetryResult(**{**result.__dict__, "enqueued": True})

    def failed_operations(
        self, *, since_s: float | None = None, stage: str | None = None, limit: int = 10_000
    ) -> list[uuid.UUID]:
        """FAILED order deductions not retried yet, oldest failure first: those that failed
        within the last ``since_s`` seconds (database clock), in ``stage``."""
        op = PendingStockOperation
        query = (
            select(op.id)
            .where(
                op.operation_type == OperationType.ORDER_DEDUCTION.value,
                op.status == S.FAILED.value,
                op.successor_operation_id.is_(None),
            )
            .order_by(op.failed_at, op.id)
            .limit(limit)
        )
        if stage is not None:
            query = query.where(op.failed_stage == stage)
        with self._database.transaction() as session:
            if since_s is not None:
                now: datetime = read_database_now(session.connection())
                query = query.where(op.failed_at >= now - timedelta(seconds=since_s))
            return list(session.scalars(query))

    def _successor(
        self, session: Session, failed: PendingStockOperation
    ) -> tuple[PendingStockOperation, bool]:
        deducted = bool(outstanding_deductions(session, failed.id))
        now = utcnow()
        successor = PendingStockOperation(
            **new_order_deduction(failed.order_id, failed.account_name, now),
            predecessor_operation_id=failed.id,
            dispatched_at=db_now(),
        )
        session.add(successor)
        session.flush()  # the unique predecessor key decides a race here
        failed.successor_operation_id = successor.id
        failed.updated_at = now
        stage = failed.failed_stage or "an unknown stage"
        operation_logger(session, failed, self._logger).log_action_with_timing(
            failed.id, LogAction.OPERATION_RETRIED, f"retried as {successor.id} (failed in {stage})"
        )
        log = operation_logger(session, successor, self._logger)
        starts = "takes over its deduction" if deducted else "starts from the load"
        log.log_action_with_timing(
            successor.id,
            LogAction.OPERATION_CREATED,
            f"operation created for order {failed.order_id}: a retry of {failed.id}, {starts}",
        )
        if deducted:
            self._take_over_deduction(session, failed, successor, log)
        return successor, deducted

    @staticmethod
    def _take_over_deduction(
        session: Session,
        failed: PendingStockOperation,
        successor: PendingStockOperation,
        log: StandardizedLogger,
    ) -> None:
        successor.line_items = failed.line_items
        successor.order_revision = failed.order_revision
        # the failed one's PUTs, for a rollback to claim, then the successor's own first one
        own = (
            [RecordedPut.for_sync(successor.id, failed.order_revision).to_dict()]
            if failed.order_revision is not None
            else []
        )
        successor.sync_puts = [*(failed.sync_puts or []), *own]
        successor.fulfillment_status_before_sync = failed.fulfillment_status_before_sync
        # the failed one's sync PUT may have landed: a cancellation of the successor must
        # roll the marketplace back whatever happens to its own
        successor.sync_put_sent_at = failed.sync_put_sent_at or utcnow()
        transition(successor, S.PROCESSING, f"line items of {failed.id} taken over", log)
        outcome = hand_over_deduction(session, failed.id, successor.id)
        log.log_action_with_timing(
            successor.id,
            LogAction.STOCK_DEDUCTION_COMPLETED,
            f"deduction of {failed.id} taken over: "
            + ", ".join(f"{m.sku} {m.delta}" for m in outcome.movements),
        )
        transition(successor, S.STOCK_DEDUCTED, f"deduction of {failed.id} taken over", log)


def _refusal(operation: PendingStockOperation) -> None:
    """RetryRefused naming why ``operation`` may not be retried; nothing when it may."""
    if operation.type_enum is OperationType.MICROSERVICE_ROLLBACK:
        raise RetryRefused(
            operation.id,
            "it is a microservice rollback; run it again with 'stock-sync rollback retry'",
        )
    if operation.type_enum is not OperationType.ORDER_DEDUCTION:
        raise RetryRefused(operation.id, f"it is a {operation.operation_type} adjustment")
    if operation.successor_operation_id is not None:
        raise RetryRefused(
            operation.id,
            f"it was retried already: its successor is {operation.successor_operation_id}",
        )
    if operation.status_enum is not S.FAILED:
        raise RetryRefused(operation.id, f"it is {operation.status}, not failed")

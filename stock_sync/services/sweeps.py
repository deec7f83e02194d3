"""The stuck-operation sweep: the backstop that makes the broker only a trigger.

A lost message, a killed worker or a Redis restart leaves an operation live but idle. The
sweep (run by celery beat) finds such operations with the shared ``is_stuck`` predicate,
claims them in bounded batches (so two sweepers never re-drive the same one in a round), and
re-drives each from its current stage. A re-drive counts as an attempt of that stage, so a
re-driven operation never gets a fresh budget and a stage that keeps dying ends FAILED.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO

from sqlalchemy import select, update

from stock_sync.adapters.db import Database, try_advisory_lock
from stock_sync.adapters.models import PendingStockOperation, utcnow
from stock_sync.adapters.settings import Settings
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.stages import (
    DEDUCT_STOCK,
    LOAD_LINE_ITEMS,
    ROLLBACK,
    SYNC_MICROSERVICE,
    VALIDATE_STOCK,
    Stage,
)
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.services.dispatch import Dispatcher
from stock_sync.services.operations import (
    lock_operation,
    operation_logger,
    retries_used,
    set_retries_used,
)
from stock_sync.services.standardized_logger import StandardizedLogger
from stock_sync.services.stock_synchronization_service import StockSynchronizationService
from stock_sync.services.stuck import is_stuck

S = OperationStatus
logger = logging.getLogger("stock_sync.sweeps")

# Any constant works; it only has to be the same for every sweeper of one database.
SWEEP_ADVISORY_LOCK_KEY = 0x5707_C5EE


@dataclass
class SweepReport:
    """What one sweep round did."""

    ran: bool = True
    redriven: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    not_enqueued: list[uuid.UUID] = field(default_factory=list)
    batches: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "ran": self.ran,
            "redriven": [str(i) for i in self.redriven],
            "failed": [str(i) for i in self.failed],
            "not_enqueued": [str(i) for i in self.not_enqueued],
            "batches": self.batches,
        }


def stage_to_redrive(operation: PendingStockOperation) -> Stage | None:
    """The stage a stuck operation is waiting for (its retry budget is that stage's)."""
    if operation.type_enum is OperationType.MICROSERVICE_ROLLBACK:
        return ROLLBACK if operation.status_enum is S.PENDING else None
    if operation.type_enum is not OperationType.ORDER_DEDUCTION:
        return None
    if operation.status_enum is S.PROCESSING and operation.deduction_retry_count:
        return DEDUCT_STOCK  # validation passed before: deduct_stock was the one waiting
    return {
        S.PENDING: LOAD_LINE_ITEMS,
        S.PROCESSING: VALIDATE_STOCK,
        S.STOCK_DEDUCTED: SYNC_MICROSERVICE,
    }.get(operation.status_enum)


class StuckOperationSweeper:
    """Finds stuck operations and re-drives them; one sweep at a time per database."""

    def __init__(
        self,
        *,
        database: Database,
        settings: Settings,
        dispatcher: Dispatcher,
        synchronization: StockSynchronizationService,
        logger: StandardizedLogger,
    ) -> None:
        self._database = database
        self._settings = settings
        self._dispatcher = dispatcher
        self._synchronization = synchronization
        self._logger = logger

    def sweep(self, *, now: datetime | None = None, max_batches: int = 10) -> SweepReport:
        """One round: at most ``max_batches`` batches of ``sweep_batch_size`` operations."""
        with self._exclusive() as acquired:
            if not acquired:
                logger.info("stuck sweep skipped: another sweep holds the lock")
                return SweepReport(ran=False)
            report = SweepReport()
            for _ in range(max_batches):
                claimed = self._claim_batch(now or utcnow())
                if not claimed:
                    break
                report.batches += 1
                for operation_id in claimed:
                    self._redrive(operation_id, report)
                if len(claimed) < self._settings.sweep_batch_size:
                    break
            if report.redriven or report.failed:
                logger.warning(
                    "stuck sweep re-drove %d and failed %d operations",
                    len(report.redriven),
                    len(report.failed),
                    extra={"sweep": report.to_dict()},
                )
            return report

    def _claim_batch(self, now: datetime) -> list[uuid.UUID]:
        """Mark a batch as touched now, so no other sweeper sees it as stuck this round."""
        op = PendingStockOperation
        candidates = (
            select(op.id)
            .where(is_stuck(now, self._settings.stuck_after_s))
            .order_by(op.updated_at)
            .limit(self._settings.sweep_batch_size)
        )
        if self._database.is_postgresql:
            candidates = candidates.with_for_update(skip_locked=True)
        with self._database.transaction() as session:
            ids = list(session.scalars(candidates))
            if ids:
                session.execute(update(op).where(op.id.in_(ids)).values(updated_at=utcnow()))
        return ids

    def _redrive(self, operation_id: uuid.UUID, report: SweepReport) -> None:
        """Re-drive one stuck operation, counting the re-drive as an attempt of its stage.

        A stage whose worker dies every time (OOM, hard time limit) would otherwise be re-driven
        forever. At the limit the lost run may have been the last scheduled retry, so it runs
        once more (the count goes one past the limit); found stuck again after that, the
        operation is failed.
        """
        with self._database.transaction() as session:
            operation = lock_operation(session, operation_id)
            stage = stage_to_redrive(operation)
            if stage is None:
                return
            policy = self._settings.retry_policy(stage.retry_budget)
            used = retries_used(operation, stage)
            exhausted = used > policy.max_retries
            if not exhausted:
                set_retries_used(operation, stage, used + 1)
                operation.updated_at = utcnow()
                last_run = " (its last run)" if used + 1 > policy.max_retries else ""
                log = operation_logger(session, operation, self._logger)
                log.log_action_with_timing(
                    operation_id,
                    LogAction.RETRY_SCHEDULED,
                    f"re-driven by the stuck sweep from {stage.name}{last_run} "
                    f"(retries used: {used + 1} of {policy.max_retries})",
                    status="warning",
                )
            status, is_rollback = operation.status_enum, stage is ROLLBACK
        if exhausted:
            if self._synchronization.fail_exhausted(operation_id, stage):
                report.failed.append(operation_id)
            return
        try:
            if is_rollback:
                self._dispatcher.enqueue_rollback(operation_id)
            else:
                self._dispatcher.enqueue_pipeline(operation_id, status)
        except Exception as error:
            logger.error(
                "stuck sweep could not enqueue %s: %s",
                operation_id,
                error,
                extra={"operation_id": str(operation_id)},
            )
            report.not_enqueued.append(operation_id)
            return
        report.redriven.append(operation_id)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[bool]:
        if self._database.is_postgresql:
            # Transaction-scoped, so that it can never stay behind on a pooled connection.
            with try_advisory_lock(self._database, SWEEP_ADVISORY_LOCK_KEY) as acquired:
                yield acquired
            return
        with _file_lock(self._settings.data_dir / "sweep.lock") as acquired:
            yield acquired


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """The embedded default's equivalent of the advisory lock: a non-blocking flock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = path.open("a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()

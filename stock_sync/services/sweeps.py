"""The stuck-operation sweep and the release of parked retries: the backstops that make the
broker only a trigger.

A lost message or a killed worker leaves an operation live but idle; a backlog leaves it
waiting. The sweep (run by celery beat) tells them apart with the shared predicates of
:mod:`stock_sync.services.stuck`, and re-drives only the stuck ones, each from its current
stage, as a new dispatch (a copy of the old one is dropped when it turns up). A lost message
costs no retry; a dead attempt counts as an attempt of its stage, so a stage that keeps dying
ends FAILED. Each round also sends a probe through the pipeline queue, which is how the next
rounds learn how far the queue has moved. The release re-enqueues retries parked in the row
once they are due.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.orm import Session

from stock_sync.adapters.db import Database, try_advisory_lock
from stock_sync.adapters.models import (
    PARKED,
    QUEUE_PROBES_TABLE,
    PendingStockOperation,
    db_now,
    utcnow,
)
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
from stock_sync.services.stuck import (
    LIVE_STATUS_VALUES,
    StuckWindow,
    is_dead,
    is_stuck,
    stuck_window,
)

S = OperationStatus
logger = logging.getLogger("stock_sync.sweeps")

# Any constant works; it only has to be the same for every sweeper of one database.
SWEEP_ADVISORY_LOCK_KEY = 0x5707_C5EE
# Probes older than this are deleted (the newest that came through is always kept).
PROBE_RETENTION = timedelta(days=1)


@dataclass
class SweepReport:
    """What one sweep round did."""

    ran: bool = True
    redriven: list[uuid.UUID] = field(default_factory=list)
    lost: list[uuid.UUID] = field(default_factory=list)
    dead: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    not_enqueued: list[uuid.UUID] = field(default_factory=list)
    batches: int = 0
    probe_sent: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "ran": self.ran,
            "redriven": [str(i) for i in self.redriven],
            "lost": len(self.lost),
            "dead": len(self.dead),
            "failed": [str(i) for i in self.failed],
            "not_enqueued": [str(i) for i in self.not_enqueued],
            "batches": self.batches,
            "probe_sent": self.probe_sent,
        }


@dataclass
class ReleaseReport:
    """What one release of parked retries did."""

    released: list[uuid.UUID] = field(default_factory=list)
    not_enqueued: list[uuid.UUID] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "released": len(self.released),
            "not_enqueued": [str(i) for i in self.not_enqueued],
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


def record_probe_consumed(database: Database, probe_id: int) -> None:
    """A worker took probe ``probe_id`` from the pipeline queue (the queue_probe task)."""
    with database.core_transaction() as connection:
        connection.execute(
            update(QUEUE_PROBES_TABLE)
            .where(
                QUEUE_PROBES_TABLE.c.id == probe_id,
                QUEUE_PROBES_TABLE.c.consumed_at.is_(None),
            )
            .values(consumed_at=db_now())
        )


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
        """One round: at most ``max_batches`` batches of ``sweep_batch_size`` operations, then
        a probe through the pipeline queue. ``now`` defaults to the database's clock."""
        with self._exclusive() as acquired:
            if not acquired:
                logger.info("stuck sweep skipped: another sweep holds the lock")
                return SweepReport(ran=False)
            report = SweepReport()
            window = self._window(now)
            seen: set[uuid.UUID] = set()
            for _ in range(max_batches):
                candidates = [i for i in self._candidates(window) if i not in seen]
                if not candidates:
                    break
                report.batches += 1
                for operation_id in candidates:
                    seen.add(operation_id)
                    self._redrive(operation_id, window, report)
                if len(candidates) < self._settings.sweep_batch_size:
                    break
            report.probe_sent = self._send_probe(window)
            if report.redriven or report.failed:
                logger.warning(
                    "stuck sweep re-drove %d (%d lost, %d dead) and failed %d operations",
                    len(report.redriven),
                    len(report.lost),
                    len(report.dead),
                    len(report.failed),
                    extra={"sweep": report.to_dict()},
                )
            return report

    def _window(self, now: datetime | None) -> StuckWindow:
        with self._database.core_transaction() as connection:
            return stuck_window(connection, self._settings, now=now)

    def _candidates(self, window: StuckWindow) -> list[uuid.UUID]:
        """A batch of stuck operations, the longest silent first; each is checked again under
        its lock before anything is done to it."""
        op = PendingStockOperation
        candidates = (
            select(op.id)
            .where(is_stuck(window))
            .order_by(func.coalesce(op.attempt_started_at, op.dispatched_at))
            .limit(self._settings.sweep_batch_size)
        )
        with self._database.transaction() as session:
            return list(session.scalars(candidates))

    def _redrive(self, operation_id: uuid.UUID, window: StuckWindow, report: SweepReport) -> None:
        """Re-drive one stuck operation as a new dispatch.

        Dead (its attempt started and never finished): the re-drive counts as an attempt of
        the stage, since a stage whose worker dies every time (OOM, hard time limit) would
        otherwise be re-driven forever. At the limit the lost run may have been the last
        scheduled retry, so it runs once more (the count goes one past the limit); found dead
        again after that, the operation is failed. Lost (its message never started): no
        attempt was made, so nothing is counted.
        """
        with self._database.transaction() as session:
            found = _still_stuck(session, operation_id, window)
            if found is None:
                return  # it moved on, started or was re-driven meanwhile
            operation, stage, dead = found
            log = operation_logger(session, operation, self._logger)
            why = self._count_dead_attempt(operation, stage) if dead else _why_lost(operation)
            if why is not None:
                generation = _new_dispatch(operation, stage, why, log)
            status = operation.status_enum
        if why is None:  # dead once more past its budget
            if self._synchronization.fail_exhausted(operation_id, stage):
                report.failed.append(operation_id)
            return
        (report.dead if dead else report.lost).append(operation_id)
        if self._enqueue(operation_id, status, stage is ROLLBACK, generation):
            report.redriven.append(operation_id)
        else:
            report.not_enqueued.append(operation_id)

    def _count_dead_attempt(self, operation: PendingStockOperation, stage: Stage) -> str | None:
        """Count a dead attempt as one of ``stage``'s retries and say why it is re-driven;
        None when the stage was past its budget already (the operation is to be failed)."""
        policy = self._settings.retry_policy(stage.retry_budget)
        used = retries_used(operation, stage)
        if used > policy.max_retries:
            return None
        set_retries_used(operation, stage, used + 1)
        last_run = " (its last run)" if used + 1 > policy.max_retries else ""
        return (
            f"its attempt started at {_shown(operation.attempt_started_at)} and "
            f"never finished{last_run} (retries used: {used + 1} of {policy.max_retries})"
        )

    def _enqueue(
        self, operation_id: uuid.UUID, status: OperationStatus, is_rollback: bool, generation: int
    ) -> bool:
        """Publish the new dispatch; False (logged) when the broker refused it: the row says
        it was dispatched, so it is found lost again once a probe passes it."""
        try:
            if is_rollback:
                self._dispatcher.enqueue_rollback(operation_id, generation)
            else:
                self._dispatcher.enqueue_pipeline(operation_id, status, generation)
        except Exception as error:
            logger.error(
                "could not enqueue %s: %s",
                operation_id,
                error,
                extra={"operation_id": str(operation_id)},
            )
            return False
        return True

    # --- probes --------------------------------------------------------------------------

    def _send_probe(self, window: StuckWindow) -> bool:
        """Send a probe through the pipeline queue unless one sent within the stuck window is
        still waiting in it (one is enough to learn when the queue moves past this moment);
        delete old probes. False when none was sent."""
        probes = QUEUE_PROBES_TABLE.c
        queue = self._settings.queue_name
        with self._database.core_transaction() as connection:
            newest_through = connection.execute(
                select(func.max(probes.id)).where(
                    probes.queue == queue, probes.consumed_at.is_not(None)
                )
            ).scalar()
            connection.execute(
                delete(QUEUE_PROBES_TABLE).where(
                    probes.queue == queue,
                    probes.dispatched_at < window.now - PROBE_RETENTION,
                    probes.id != (newest_through or 0),
                )
            )
            waiting = connection.execute(
                select(func.count()).where(
                    probes.queue == queue,
                    probes.consumed_at.is_(None),
                    probes.dispatched_at >= window.threshold,
                )
            ).scalar()
            if waiting:
                return False
            probe_id = connection.execute(
                insert(QUEUE_PROBES_TABLE)
                .values(queue=queue, dispatched_at=db_now())
                .returning(probes.id)
            ).scalar_one()
        try:
            self._dispatcher.enqueue_probe(int(probe_id))
        except Exception as error:
            logger.error("could not enqueue the queue probe: %s", error)
            return False
        return True

    # --- parked retries ------------------------------------------------------------------

    def release_due_retries(self, *, max_batches: int = 10) -> ReleaseReport:
        """Re-enqueue the retries parked in their rows whose time has come, as new dispatches
        (at most ``max_batches`` batches of ``sweep_batch_size``)."""
        report = ReleaseReport()
        for _ in range(max_batches):
            released = self._release_batch()
            for operation_id, status, operation_type, generation in released:
                is_rollback = operation_type == OperationType.MICROSERVICE_ROLLBACK.value
                if self._enqueue(operation_id, OperationStatus(status), is_rollback, generation):
                    report.released.append(operation_id)
                else:
                    report.not_enqueued.append(operation_id)
            if len(released) < self._settings.sweep_batch_size:
                break
        if report.released or report.not_enqueued:
            logger.info("released %d parked retries", len(report.released), extra=report.to_dict())
        return report

    def _release_batch(self) -> list[tuple[uuid.UUID, str, str, int]]:
        op = PendingStockOperation
        due = (
            select(op.id)
            .where(
                text(PARKED),
                op.status.in_(LIVE_STATUS_VALUES),
                op.next_retry_at <= db_now(),
            )
            .order_by(op.next_retry_at)
            .limit(self._settings.sweep_batch_size)
        )
        if self._database.is_postgresql:
            due = due.with_for_update(skip_locked=True)
        with self._database.transaction() as session:
            rows = session.execute(
                update(op)
                .where(op.id.in_(due.scalar_subquery()))
                .values(
                    dispatch_generation=op.dispatch_generation + 1,
                    dispatched_at=db_now(),
                    updated_at=utcnow(),
                )
                .returning(op.id, op.status, op.operation_type, op.dispatch_generation)
                .execution_options(synchronize_session=False)
            ).all()
        return [(row[0], row[1], row[2], row[3]) for row in rows]

    # --- one sweeper at a time -----------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[bool]:
        if self._database.is_postgresql:
            # Transaction-scoped, so that it can never stay behind on a pooled connection.
            with try_advisory_lock(self._database, SWEEP_ADVISORY_LOCK_KEY) as acquired:
                yield acquired
            return
        with _file_lock(self._settings.data_dir / "sweep.lock") as acquired:
            yield acquired


def _still_stuck(
    session: Session, operation_id: uuid.UUID, window: StuckWindow
) -> tuple[PendingStockOperation, Stage, bool] | None:
    """The operation locked, the stage it waits for and whether its attempt is dead; None
    when it is no longer stuck (checked again under its lock)."""
    op = PendingStockOperation
    operation = lock_operation(session, operation_id)
    stage = stage_to_redrive(operation)
    still_stuck = session.scalar(select(op.id).where(op.id == operation_id, is_stuck(window)))
    if stage is None or still_stuck is None:
        return None
    dead = session.scalar(select(op.id).where(op.id == operation_id, is_dead(window)))
    return operation, stage, dead is not None


def _why_lost(operation: PendingStockOperation) -> str:
    return (
        f"its message, published at {_shown(operation.dispatched_at)}, was lost "
        "(the queue has moved past it); no retry counted"
    )


def _new_dispatch(
    operation: PendingStockOperation, stage: Stage, why: str, log: StandardizedLogger
) -> int:
    """Make the operation's next dispatch (a copy of the old one is dropped) and log why."""
    generation = operation.dispatch_generation + 1
    operation.dispatch_generation = generation
    operation.dispatched_at = db_now()
    operation.attempt_started_at = None
    operation.next_retry_at = None
    operation.updated_at = utcnow()
    log.log_action_with_timing(
        operation.id,
        LogAction.RETRY_SCHEDULED,
        f"re-driven by the stuck sweep from {stage.name}: {why}",
        status="warning",
    )
    return generation


def _shown(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "an unknown time"


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

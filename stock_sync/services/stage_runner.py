"""StageRunner: runs a registered stage and keeps its retry bookkeeping.

The services register their stage bodies (the pipeline's with StockSynchronizationService,
the microservice rollback with OperationCancellationService); the runner runs one and turns
what it raised into a retry counted in the row, a retry *parked* in the row, or FAILED past
the stage's budget. Nothing here knows about Celery: a stage returns a :class:`StageResult`
and the task turns ``retry_in_s`` into ``Task.retry``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from stock_sync.adapters.db import Database, after_commit
from stock_sync.adapters.error_reporting import NO_ERROR_REPORTER, ErrorReporter, FailedOperation
from stock_sync.adapters.models import PendingStockOperation, read_database_now, utcnow
from stock_sync.adapters.notifications import Notification, Notifier
from stock_sync.adapters.redaction import one_line
from stock_sync.adapters.settings import Settings
from stock_sync.domain.errors import OperationNotFound, StockSyncError
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.retry_policy import RetryPolicy
from stock_sync.domain.stages import VALIDATE_STOCK, Stage, StageOutcome
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.domain.stock import ValidationResult
from stock_sync.services.operations import (
    lock_operation,
    operation_logger,
    retries_used,
    set_retries_used,
    transition,
)
from stock_sync.services.standardized_logger import StandardizedLogger

S = OperationStatus
stage_logger = logging.getLogger("stock_sync.stages")
# How long a stored or reported error may be: one line, cut without a marker.
ERROR_TEXT_MAX_CHARS = 500

StageBody = Callable[[uuid.UUID, int | None], StageOutcome]
# Told, in the failing transaction, that an operation of its type went to FAILED.
FailureHook = Callable[[Session, PendingStockOperation], None]


@dataclass(frozen=True)
class StageResult:
    """What a stage did; ``retry_in_s`` asks the caller to run the stage again later."""

    outcome: StageOutcome
    retry_in_s: float | None = None

    @property
    def continues_chain(self) -> bool:
        return self.retry_in_s is None and self.outcome.continues_chain


class StageStopped(Exception):
    """Raised by a stage body that handed its operation elsewhere from deep inside (a failed
    sync PUT found the operation cancelled and a rollback made): the stage stops, no retry."""


def error_text(error: BaseException) -> str:
    """``error`` as the row stores it and the failure reports quote it: one line, at most
    ERROR_TEXT_MAX_CHARS, the type's name when it has no message."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    return one_line(text, ERROR_TEXT_MAX_CHARS, line_break=" ", cut_marker="")


class StageRunner:
    """Runs the stages registered with it; collaborators are passed in (see composition)."""

    def __init__(
        self,
        *,
        database: Database,
        logger: StandardizedLogger,
        notifier: Notifier,
        settings: Settings,
        error_reporter: ErrorReporter = NO_ERROR_REPORTER,
    ) -> None:
        self._database = database
        self._logger = logger
        self.notifier = notifier
        self._settings = settings
        self._error_reporter = error_reporter
        self._bodies: dict[str, StageBody] = {}
        self._failure_hooks: dict[OperationType, FailureHook] = {}

    def register(self, stage: Stage, body: StageBody) -> None:
        """``body`` does the work of ``stage``; the runner handles what it raises."""
        self._bodies[stage.name] = body

    def on_failed(self, operation_type: OperationType, hook: FailureHook) -> None:
        """``hook`` is told, in the same transaction, that an operation of ``operation_type``
        went to FAILED."""
        self._failure_hooks[operation_type] = hook

    # --- running a stage -------------------------------------------------------------------

    def execute(
        self, stage: Stage, operation_id: uuid.UUID, generation: int | None = None
    ) -> StageResult:
        """Run one stage; a failure becomes a scheduled retry or, past the limit, FAILED.

        ``generation``: the dispatch the message belongs to (None for a message that carries
        none); a copy of an older dispatch is dropped at once (see services.stuck)."""
        try:
            return StageResult(self._bodies[stage.name](operation_id, generation))
        except StageStopped:
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

    # --- retries ---------------------------------------------------------------------------

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
            failure = _Failure(
                session, operation_logger(session, operation, self._logger), operation, stage, error
            )
            policy = self._settings.retry_policy(stage.retry_budget)
            if policy.exhausted(retries_used(operation, stage)):
                self._give_up(failure)
                return StageResult(StageOutcome.STOPPED)
            return self._schedule_retry(failure, policy)

    def _give_up(self, failure: _Failure) -> None:
        """FAILED: the stage used its whole retry budget and failed once more."""
        operation, stage = failure.operation, failure.stage
        self._log_failure(failure, next_retry_at=None)
        failure.log.log_action_with_timing(
            operation.id,
            LogAction.MAX_RETRIES_REACHED,
            f"stage {stage.name} gave up after {retries_used(operation, stage)} retries",
            status="error",
        )
        self._fail(failure, f"retry limit of {stage.name} reached")

    def _schedule_retry(self, failure: _Failure, policy: RetryPolicy) -> StageResult:
        """Count one more retry in the row and say when it runs: a countdown message, or
        parked in the row for beat to release (no message until then)."""
        session, log, operation, stage, error = _unpacked(failure)
        used = retries_used(operation, stage) + 1
        set_retries_used(operation, stage, used)
        delay = policy.delay_for(used, at_least_s=getattr(error, "retry_after_s", None))
        parked = delay > self._settings.retry_park_after_s
        now = read_database_now(session.connection())
        _stamp_retry(operation, error, next_retry_at=now + timedelta(seconds=delay))
        # parked: no message exists until beat releases it; otherwise the countdown copy is
        # published right after this commits
        operation.dispatched_at = None if parked else now
        log.bind(
            operation.id,
            order_id=operation.order_id,
            status=operation.status,
            attempt=used,
            next_retry_at=operation.next_retry_at,
            max_retries=policy.max_retries,
            stage=stage.name,
        )
        self._log_failure(failure, next_retry_at=operation.next_retry_at)
        waits = "waits in the database" if parked else "in"
        log.log_action_with_timing(
            operation.id,
            LogAction.RETRY_SCHEDULED,
            f"retry {used} of {policy.max_retries} of {stage.name} {waits} {delay:.3f}s",
            status="warning",
        )
        return StageResult(StageOutcome.STOPPED, retry_in_s=None if parked else delay)

    # --- failure ---------------------------------------------------------------------------

    def fail_operation(self, operation_id: uuid.UUID, stage: Stage, error: Exception) -> None:
        """A permanent error: the operation goes to FAILED at once, if still in the stage."""
        with self._database.transaction() as session:
            operation = lock_operation(session, operation_id)
            if operation.status_enum is not stage.status:
                return
            log = operation_logger(session, operation, self._logger)
            failure = _Failure(session, log, operation, stage, error)
            self._log_failure(failure, next_retry_at=None)
            self._fail(failure, f"permanent error in {stage.name}")

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
                _Failure(session, log, operation, stage, error),
                f"retry limit of {stage.name} reached",
                error_type=operation.last_error_type,
            )
            return True

    def _fail(self, failure: _Failure, reason: str, *, error_type: str | None = None) -> None:
        """FAILED in the failing stage, with its error; ``error_type`` names the error's type
        when the error only carries the message of one recorded earlier (the sweep failing a
        dead stage)."""
        session, log, operation, stage, error = _unpacked(failure)
        error_type = error_type or type(error).__name__
        text = error_text(error)
        operation.last_error = text
        operation.last_error_type = error_type
        operation.failed_stage = stage.name
        log.log_action_with_timing(
            operation.id, LogAction.OPERATION_FAILED, f"{reason}: {text}", status="error"
        )
        kept = " (stock stays deducted)" if operation.status_enum is S.STOCK_DEDUCTED else ""
        transition(operation, S.FAILED, reason + kept, log)
        hook = self._failure_hooks.get(operation.type_enum)
        if hook is not None:
            hook(session, operation)
        self._notify_after_commit(
            failure,
            "operation_failed",
            f"operation failed: {reason}{kept}",
            {"error_type": error_type, "error": text},
        )
        report = FailedOperation(
            operation.id, operation.order_id, stage.name, error_type, text, reason
        )
        after_commit(session, lambda: self._error_reporter.operation_failed(report))

    def _log_failure(self, failure: _Failure, *, next_retry_at: datetime | None) -> None:
        _, log, operation, stage, error = _unpacked(failure)
        result = getattr(error, "validation_result", None)
        if stage is VALIDATE_STOCK and isinstance(result, ValidationResult):
            log.log_validation_failure(operation.id, result)
            self._notify_after_commit(
                failure,
                "stock_validation_failed",
                str(error),
                {"next_retry_at": str(next_retry_at) if next_retry_at else None},
            )
            return
        log.log_error_with_context(
            operation.id,
            error,
            {"action": stage.failure_action, "stage": stage.name, "next_retry_at": next_retry_at},
        )

    def _notify_after_commit(
        self, failure: _Failure, kind: str, message: str, details: dict[str, Any]
    ) -> None:
        """Tell of the failing operation. Senders are e-mail or chat (network calls): never
        inside the transaction, and never for a change that rolled back."""
        operation = failure.operation
        notification = Notification(
            kind=kind,
            operation_id=operation.id,
            order_id=operation.order_id,
            message=message,
            details=details,
        )
        after_commit(failure.session, lambda: self.notifier.notify(notification))


@dataclass(frozen=True)
class _Failure:
    """A stage's failure being recorded: in ``session``, on the locked ``operation``."""

    session: Session
    log: StandardizedLogger
    operation: PendingStockOperation
    stage: Stage
    error: Exception


def _unpacked(
    failure: _Failure,
) -> tuple[Session, StandardizedLogger, PendingStockOperation, Stage, Exception]:
    return failure.session, failure.log, failure.operation, failure.stage, failure.error


def _stamp_retry(
    operation: PendingStockOperation, error: Exception, *, next_retry_at: datetime
) -> None:
    """The row's record of a scheduled retry: when it runs and what failed."""
    operation.next_retry_at = next_retry_at
    operation.attempt_started_at = None
    operation.last_error = error_text(error)
    operation.last_error_type = type(error).__name__
    operation.updated_at = utcnow()

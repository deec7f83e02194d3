"""StandardizedLogger: the seed's four logging methods, one JSON vocabulary for every step.

Every record carries ``operation_id``, ``order_id``, ``action`` (a LogAction value), the
operation's current ``status`` and ``attempt``. When an event store is attached, each record is
also written to the operation event table in the caller's transaction, so the audit trail
commits or rolls back together with the change it describes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from stock_sync.domain.errors import StockSyncError
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.statuses import OperationStatus
from stock_sync.domain.stock import ValidationResult

OPERATIONS_LOGGER = "stock_sync.operations"

# The seed's ``status`` argument of log_action_with_timing is an outcome level.
_OUTCOME_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "success": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# The action an error is logged under when the caller does not name one: the failing stage's.
_FAILURE_ACTION_BY_STATUS = {
    OperationStatus.PENDING.value: LogAction.LINE_ITEMS_LOAD_FAILED,
    OperationStatus.PROCESSING.value: LogAction.STOCK_DEDUCTION_FAILED,
    OperationStatus.STOCK_DEDUCTED.value: LogAction.MICROSERVICE_SYNC_FAILED,
}


class EventStore(Protocol):
    """Where audit events go (the operation event table, or a fake in tests)."""

    def record(
        self,
        *,
        operation_id: UUID,
        action: str,
        from_status: str | None,
        to_status: str | None,
        error_type: str | None,
        details: dict[str, Any],
    ) -> None: ...


@dataclass
class OperationContext:
    """What every record of one operation carries."""

    operation_id: UUID
    order_id: str | None = None
    status: str | None = None
    attempt: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        return {
            "operation_id": str(self.operation_id),
            "order_id": self.order_id,
            "status": self.status,
            "attempt": self.attempt,
            **self.extra,
        }


class Timer:
    """Elapsed wall time of a block, in whole milliseconds."""

    def __init__(self) -> None:
        self._started = time.perf_counter()
        self._stopped: float | None = None

    def stop(self) -> None:
        self._stopped = time.perf_counter()

    @property
    def elapsed_ms(self) -> int:
        end = self._stopped if self._stopped is not None else time.perf_counter()
        return round((end - self._started) * 1000)


@contextmanager
def measure_execution_time() -> Iterator[Timer]:
    """``with measure_execution_time() as timer: ...`` then read ``timer.elapsed_ms``."""
    timer = Timer()
    try:
        yield timer
    finally:
        timer.stop()


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(item) for item in value]
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, OperationStatus | LogAction):
        return value.value
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _action_value(action: LogAction | str) -> str:
    return action.value if isinstance(action, LogAction) else LogAction(action).value


class StandardizedLogger:
    """Central logging for stock operations (the seed's interface, same signatures)."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        events: EventStore | None = None,
    ) -> None:
        self._logger = logger or logging.getLogger(OPERATIONS_LOGGER)
        self._events = events
        self._contexts: dict[UUID, OperationContext] = {}

    # --- context -------------------------------------------------------------------------

    def bind(
        self,
        operation_id: UUID,
        *,
        order_id: str | None = None,
        status: OperationStatus | str | None = None,
        attempt: int = 0,
        **extra: Any,
    ) -> OperationContext:
        """Remember what every record of this operation carries from now on."""
        context = OperationContext(
            operation_id=operation_id,
            order_id=order_id,
            status=_json_safe(status),
            attempt=attempt,
            extra=_json_safe(extra),
        )
        self._contexts[operation_id] = context
        return context

    def context(self, operation_id: UUID) -> OperationContext:
        return self._contexts.get(operation_id) or self.bind(operation_id)

    def with_events(self, events: EventStore | None) -> StandardizedLogger:
        """The same logger writing audit events to ``events``, with contexts of its own.

        A service keeps one base logger for its life; a logger per unit of work binds its
        operations on itself, so the base never accumulates a context per operation.
        """
        return StandardizedLogger(self._logger, events)

    # --- the seed's four methods ---------------------------------------------------------

    def log_status_transition(
        self,
        operation_id: UUID,
        from_status: OperationStatus,
        to_status: OperationStatus,
        reason: str,
        additional_context: dict[str, Any] | None = None,
    ) -> None:
        """Log a status change; the bound status becomes ``to_status``."""
        context = self.context(operation_id)
        context.status = OperationStatus(to_status).value
        details = {"reason": reason, **(additional_context or {})}
        self._emit(
            logging.INFO,
            operation_id,
            LogAction.STATUS_TRANSITION,
            f"status {OperationStatus(from_status).value} -> {context.status}: {reason}",
            {"from_status": OperationStatus(from_status).value, "to_status": context.status},
            details,
        )

    def log_action_with_timing(
        self,
        operation_id: UUID,
        action: str,
        details: str,
        execution_time_ms: int | None = None,
        status: str = "info",
    ) -> None:
        """Log one step of the vocabulary; ``status`` is the outcome level (info, warning...)."""
        fields: dict[str, Any] = {"outcome": status}
        if execution_time_ms is not None:
            fields["execution_time_ms"] = execution_time_ms
        self._emit(
            _OUTCOME_LEVELS.get(status, logging.INFO),
            operation_id,
            action,
            details,
            fields,
            {"details": details, **fields},
        )

    def log_validation_failure(
        self, operation_id: UUID, validation_result: ValidationResult
    ) -> None:
        """Log each failing line (sku, requested, available) and each unknown SKU."""
        failures = [
            {"sku": s.sku, "requested": s.requested, "available": s.available}
            for s in validation_result.shortages
        ]
        failures += [
            {"sku": sku, "requested": validation_result.requested.get(sku), "available": None}
            for sku in validation_result.unknown_skus
        ]
        fields = {
            "validation_failures": failures,
            "unknown_skus": list(validation_result.unknown_skus),
            "checked_lines": validation_result.checked_lines,
        }
        self._emit(
            logging.WARNING,
            operation_id,
            LogAction.STOCK_VALIDATION_FAILED,
            f"stock validation failed: {validation_result.to_error()}",
            fields,
            fields,
            error_type=type(validation_result.to_error()).__name__,
        )

    def log_error_with_context(
        self, operation_id: UUID, error: Exception, context: dict[str, Any]
    ) -> None:
        """Log an error with its type, message, context and next retry time when known.

        ``context`` may name the ``action`` (default: the current stage's *_FAILED action)
        and carry ``next_retry_at``.
        """
        bound = self.context(operation_id)
        extra = dict(context)
        action = extra.pop("action", None) or _FAILURE_ACTION_BY_STATUS.get(
            bound.status or "", LogAction.OPERATION_FAILED
        )
        retryable = getattr(error, "retryable", False) and isinstance(error, StockSyncError)
        fields = {
            "error_type": type(error).__name__,
            "error_message": str(error),
            "retryable": retryable,
            "next_retry_at": _json_safe(extra.pop("next_retry_at", None)),
            "context": _json_safe(extra),
        }
        self._emit(
            logging.WARNING if retryable else logging.ERROR,
            operation_id,
            action,
            f"{type(error).__name__}: {error}",
            fields,
            fields,
            error_type=type(error).__name__,
        )

    # --- plumbing ----------------------------------------------------------------------

    def _emit(
        self,
        level: int,
        operation_id: UUID,
        action: LogAction | str,
        message: str,
        fields: dict[str, Any],
        event_details: dict[str, Any],
        *,
        error_type: str | None = None,
    ) -> None:
        context = self.context(operation_id)
        action_value = _action_value(action)
        if self._logger.isEnabledFor(level):  # the record's fields only when it is written
            record_fields = {**context.fields(), "action": action_value, **_json_safe(fields)}
            self._logger.log(level, message, extra=record_fields)
        if self._events is not None:
            self._events.record(
                operation_id=operation_id,
                action=action_value,
                from_status=fields.get("from_status"),
                to_status=fields.get("to_status"),
                error_type=error_type,
                details={"attempt": context.attempt, **_json_safe(event_details)},
            )

"""The operation lifecycle: statuses, operation types and the one transition table.

Every status change in stock-sync goes through :func:`ensure_transition`; the allowed
moves are the literal tables below and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

from stock_sync.domain.errors import InvalidTransition


class OperationStatus(str, Enum):
    """The six statuses of the seed design, with its values."""

    PENDING = "pending"
    PROCESSING = "processing"
    STOCK_DEDUCTED = "stock_deducted"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class OperationType(str, Enum):
    """What an operation does: an order's deduction, or an adjustment made by a rollback."""

    ORDER_DEDUCTION = "order_deduction"
    STOCK_RESTORATION = "stock_restoration"
    MICROSERVICE_ROLLBACK = "microservice_rollback"


S = OperationStatus

# The seed's diagram, row for row: PENDING -> PROCESSING (line items loaded) -> STOCK_DEDUCTED
# (stock deducted) -> COMPLETED (synced); cancel from the first four; FAILED after retries.
ORDER_DEDUCTION_TRANSITIONS: Mapping[OperationStatus, frozenset[OperationStatus]] = {
    S.PENDING: frozenset({S.PROCESSING, S.CANCELLED, S.FAILED}),
    S.PROCESSING: frozenset({S.STOCK_DEDUCTED, S.CANCELLED, S.FAILED}),
    S.STOCK_DEDUCTED: frozenset({S.COMPLETED, S.CANCELLED, S.FAILED}),
    S.COMPLETED: frozenset({S.CANCELLED}),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}

# Adjustments are created by a cancellation and only ever succeed or give up.
ADJUSTMENT_TRANSITIONS: Mapping[OperationStatus, frozenset[OperationStatus]] = {
    S.PENDING: frozenset({S.COMPLETED, S.FAILED}),
    S.PROCESSING: frozenset(),
    S.STOCK_DEDUCTED: frozenset(),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}

TRANSITIONS: Mapping[OperationType, Mapping[OperationStatus, frozenset[OperationStatus]]] = {
    OperationType.ORDER_DEDUCTION: ORDER_DEDUCTION_TRANSITIONS,
    OperationType.STOCK_RESTORATION: ADJUSTMENT_TRANSITIONS,
    OperationType.MICROSERVICE_ROLLBACK: ADJUSTMENT_TRANSITIONS,
}

INITIAL_STATUS = S.PENDING
FINAL_STATUSES: frozenset[OperationStatus] = frozenset({S.FAILED, S.CANCELLED})
# COMPLETED is terminal for processing (no stage runs after it) but can still be cancelled.
TERMINAL_STATUSES: frozenset[OperationStatus] = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})
ACTIVE_STATUSES: frozenset[OperationStatus] = frozenset(OperationStatus) - TERMINAL_STATUSES
CANCELLABLE_STATUSES: frozenset[OperationStatus] = frozenset(
    status for status, targets in ORDER_DEDUCTION_TRANSITIONS.items() if S.CANCELLED in targets
)


def can_transition(
    from_status: OperationStatus,
    to_status: OperationStatus,
    operation_type: OperationType = OperationType.ORDER_DEDUCTION,
) -> bool:
    """True when the table allows ``from_status -> to_status`` for this kind of operation."""
    return to_status in TRANSITIONS[operation_type][from_status]


def ensure_transition(
    from_status: OperationStatus,
    to_status: OperationStatus,
    operation_type: OperationType = OperationType.ORDER_DEDUCTION,
) -> None:
    """Raise :class:`InvalidTransition` unless the table allows the move."""
    if not can_transition(from_status, to_status, operation_type):
        raise InvalidTransition(from_status.value, to_status.value)


def reachable_from(
    status: OperationStatus,
    operation_type: OperationType = OperationType.ORDER_DEDUCTION,
) -> frozenset[OperationStatus]:
    """Every status reachable from ``status`` (itself included) by allowed moves."""
    table = TRANSITIONS[operation_type]
    seen = {status}
    frontier = [status]
    while frontier:
        for target in table[frontier.pop()]:
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    return frozenset(seen)

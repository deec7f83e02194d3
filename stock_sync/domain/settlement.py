"""How an order deduction's processing ended: the one definition of the error rate.

An order deduction is *settled* when its processing ends: COMPLETED (the stock is taken and the
marketplace knows) or FAILED (a stage ran out of retries). Each one settles once, by the first
of those it reaches: a completed one cancelled later stays settled as completed, one cancelled
before it settled never settles, and a retried FAILED one and its successor (``stock-sync
retry``) are two order deductions, each settling once. Adjustments (restorations, microservice
rollbacks) never settle: they are a cancellation's bookkeeping, not processing.

The error rate, for the Prometheus rule and the in-app alert alike, is failed / settled over a
window. The counters ``order_deductions_settled{outcome}`` are raised by the transition event
that settles an operation (it carries the operation type: :func:`transition_details`), in the
transaction that stamps the row's ``completed_at`` or ``failed_at``; a window of the counter's
increase is therefore the order deductions whose stamp falls in it.

The processing time (creation to completion) of a completed order deduction feeds a histogram
with the fixed :data:`PROCESSING_BUCKETS_S`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from stock_sync.domain.statuses import OperationStatus, OperationType

COMPLETED = "completed"
FAILED = "failed"
# The status that settles an order deduction -> the outcome it is counted under.
SETTLED_OUTCOMES: Mapping[OperationStatus, str] = {
    OperationStatus.COMPLETED: COMPLETED,
    OperationStatus.FAILED: FAILED,
}
OUTCOMES = (COMPLETED, FAILED)

# Upper bounds (seconds) of the processing-time histogram's buckets; 300 s, the default
# STOCK_SYNC_ALERT_PROCESSING_TIME_THRESHOLD_S, is one of them, so "p95 above 300 s" is read
# off the histogram exactly (more than 5 % of completions in the buckets above it).
PROCESSING_BUCKETS_S = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
INFINITY_LABEL = "+Inf"

# Keys of a transition event's details.
OPERATION_TYPE_KEY = "operation_type"
PROCESSING_KEY = "processing_s"


def settled_outcome(operation_type: object, to_status: object) -> str | None:
    """``completed`` or ``failed`` when a move of an operation of ``operation_type`` to
    ``to_status`` settles an order deduction; None for every other move (values or enums)."""
    if _value(operation_type) != OperationType.ORDER_DEDUCTION.value:
        return None
    for status, outcome in SETTLED_OUTCOMES.items():
        if _value(to_status) == status.value:
            return outcome
    return None


def transition_details(
    operation_type: OperationType | str,
    to_status: OperationStatus,
    *,
    created_at: datetime | None,
    now: datetime,
) -> dict[str, Any]:
    """What a transition event records besides its reason: the operation's type, and for a
    completion its processing time (creation to now, in seconds)."""
    details: dict[str, Any] = {OPERATION_TYPE_KEY: _value(operation_type)}
    if to_status is OperationStatus.COMPLETED and created_at is not None:
        details[PROCESSING_KEY] = round(max(0.0, (now - created_at).total_seconds()), 3)
    return details


def bucket_label(bound: float) -> str:
    """A bucket's ``le`` label: ``300``, ``2.5``."""
    return f"{bound:g}"


def processing_bucket(seconds: float) -> str:
    """The ``le`` label of the smallest bucket holding ``seconds``, or ``+Inf``."""
    for bound in PROCESSING_BUCKETS_S:
        if seconds <= bound:
            return bucket_label(bound)
    return INFINITY_LABEL


def _value(item: object) -> object:
    return item.value if isinstance(item, OperationStatus | OperationType) else item

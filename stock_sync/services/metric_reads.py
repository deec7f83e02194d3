"""The SQL behind the monitoring metrics (stock_sync/services/metrics.py gathers them).

Each read is a small indexed query whose cost grows with the rows of the recent window, never
with the table: live statuses and terminal ones read the (status, updated_at) index, creations
the created_at index, completions the completed_at index and errors the partial
(at, error_type) index of ``operation_events``. The same code runs on PostgreSQL and SQLite;
only the processing-time percentile differs (``percentile_cont`` in PostgreSQL, the same
interpolation in Python on SQLite).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, TextClause, exists, extract, func, select, text
from sqlalchemy.orm import Session, aliased

from stock_sync.adapters.maintenance_runs import MARKETPLACE_AUDIT, last_runs
from stock_sync.adapters.models import (
    PARKED,
    MetricCounter,
    OperationEvent,
    PendingStockOperation,
)
from stock_sync.domain.settlement import COMPLETED, FAILED
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.services.stuck import LIVE_STATUS_VALUES, StuckWindow, is_stuck, is_waiting

LIVE_STATUSES = (
    OperationStatus.PENDING.value,
    OperationStatus.PROCESSING.value,
    OperationStatus.STOCK_DEDUCTED.value,
)
FINISHED_STATUSES = (
    OperationStatus.COMPLETED.value,
    OperationStatus.FAILED.value,
    OperationStatus.CANCELLED.value,
)
ORDER_DEDUCTION = OperationType.ORDER_DEDUCTION.value
SAMPLE_SIZE = 10  # operation ids shown with a figure: enough to start a look, short enough to read
SLOWEST_SAMPLE_SIZE = 5
P95 = 0.95

Op = PendingStockOperation


@dataclass(frozen=True)
class ProcessingTimes:
    """Processing time (completed_at - created_at) of the order deductions completed lately."""

    count: int = 0
    avg_s: float = 0.0
    p95_s: float = 0.0
    slowest_ids: tuple[str, ...] = ()


def counter_values(session: Session) -> dict[str, dict[str, int]]:
    """``metric_counters`` as {counter name: {label: value}}, the shards summed (a few rows)."""
    values: dict[str, dict[str, int]] = {}
    counters = MetricCounter
    for name, label, value in session.execute(
        select(counters.name, counters.label, func.sum(counters.value)).group_by(
            counters.name, counters.label
        )
    ):
        values.setdefault(name, {})[label] = int(value)
    return values


def last_successes(session: Session) -> dict[str, datetime]:
    """Each maintenance_runs row's last success (a handful of rows)."""
    found = {task: run.last_success_at for task, run in last_runs(session).items()}
    return {task: moment for task, moment in sorted(found.items()) if moment is not None}


def marketplace_drift(session: Session) -> dict[str, int]:
    """The last marketplace audit's drift: found, and left unrepaired (0 before any audit)."""
    run = last_runs(session).get(MARKETPLACE_AUDIT)
    summary = dict(run.summary) if run is not None and run.ok else {}
    found = int(summary.get("drift", 0) or 0)
    return {"found": found, "unrepaired": found - int(summary.get("repaired", 0) or 0)}


def _counts_by(session: Session, key: Any, *conditions: ColumnElement[bool]) -> dict[str, int]:
    rows = session.execute(select(key, func.count()).where(*conditions).group_by(key))
    return {str(value): int(count) for value, count in rows}


def _count(session: Session, *conditions: ColumnElement[bool] | TextClause) -> int:
    return int(session.scalar(select(func.count()).where(*conditions)) or 0)


def _sample_ids(
    session: Session, conditions: Sequence[ColumnElement[bool]], order: Any
) -> tuple[str, ...]:
    """Up to :data:`SAMPLE_SIZE` operation ids meeting ``conditions``, first by ``order``."""
    query = select(Op.id).where(*conditions).order_by(order).limit(SAMPLE_SIZE)
    return tuple(str(operation_id) for operation_id in session.scalars(query))


def live_counts(session: Session) -> dict[str, int]:
    """Operations of every type per live status, every live status present."""
    counts = _counts_by(session, Op.status, Op.status.in_(LIVE_STATUSES))
    return {status: counts.get(status, 0) for status in LIVE_STATUSES}


def finished_counts(session: Session, since: datetime) -> dict[str, int]:
    """Order deductions that reached each terminal status since ``since``.

    A terminal row's ``updated_at`` is when it got there, so (status, updated_at) answers it.
    """
    counts = _counts_by(
        session,
        Op.status,
        Op.status.in_(FINISHED_STATUSES),
        Op.updated_at >= since,
        Op.operation_type == ORDER_DEDUCTION,
    )
    return {status: counts.get(status, 0) for status in FINISHED_STATUSES}


def settled_counts(session: Session, since: datetime) -> dict[str, int]:
    """Order deductions settled since ``since``, by outcome: those whose ``completed_at`` or
    ``failed_at`` falls in the window. The transition that stamps it raises the settled
    counter in the same transaction, so these are the counters' increase over the window.

    ``completed_at`` stays when a completed one is cancelled later (it still counts as
    completed, once); ``failed_at`` is read through the (status, updated_at) index: a FAILED
    row's ``updated_at`` is its failure or later (a retry links its successor), never earlier.
    """
    deduction = Op.operation_type == ORDER_DEDUCTION
    failed = (
        Op.status == OperationStatus.FAILED.value,
        Op.updated_at >= since,
        Op.failed_at >= since,
        deduction,
    )
    return {
        COMPLETED: _count(session, Op.completed_at >= since, deduction),
        FAILED: _count(session, *failed),
    }


def created_count(session: Session, since: datetime) -> int:
    """Order deductions created since ``since``: the denominator of the cancellation ratio."""
    return _count(session, Op.created_at >= since, Op.operation_type == ORDER_DEDUCTION)


def error_counts(session: Session, since: datetime) -> dict[str, int]:
    """Error events since ``since`` by error type (the partial index holds only error rows)."""
    event = OperationEvent
    return _counts_by(session, event.error_type, event.error_type.is_not(None), event.at >= since)


def recently_finished_ids(session: Session, status: str, since: datetime) -> tuple[str, ...]:
    """The latest few order deductions that reached ``status`` since ``since``."""
    conditions = (Op.status == status, Op.updated_at >= since, Op.operation_type == ORDER_DEDUCTION)
    return _sample_ids(session, conditions, Op.updated_at.desc())


def _unresolved_failed_rollbacks() -> tuple[ColumnElement[bool], ...]:
    """Microservice rollbacks that gave up and are still their operation's latest one (the
    highest number, taken under the parent's lock: no worker's clock decides): counted by
    state, not by window, so they stay counted until an operator runs one again
    (``stock-sync rollback retry``), whose new adjustment resolves them."""
    newer = aliased(PendingStockOperation)
    rollback = OperationType.MICROSERVICE_ROLLBACK.value
    return (
        Op.status == OperationStatus.FAILED.value,
        Op.operation_type == rollback,
        ~exists().where(
            newer.parent_operation_id == Op.parent_operation_id,
            newer.operation_type == rollback,
            newer.rollback_seq > Op.rollback_seq,
        ),
    )


def failed_rollback_count(session: Session) -> int:
    """Failed microservice rollbacks nobody has run again yet."""
    return _count(session, *_unresolved_failed_rollbacks())


def failed_rollback_ids(session: Session) -> tuple[str, ...]:
    return _sample_ids(session, _unresolved_failed_rollbacks(), Op.updated_at.desc())


def stuck_count(session: Session, window: StuckWindow) -> int:
    """Live operations whose message was lost or whose attempt died (see services.stuck)."""
    return _count(session, is_stuck(window))


def stuck_ids(session: Session, window: StuckWindow) -> tuple[str, ...]:
    """Up to :data:`SAMPLE_SIZE` stuck operations, the longest silent first."""
    silent_since = func.coalesce(Op.attempt_started_at, Op.dispatched_at)
    return _sample_ids(session, [is_stuck(window)], silent_since)


def waiting_count(session: Session, window: StuckWindow) -> int:
    """Live operations whose message waits in the queue (a backlog, not a fault)."""
    return _count(session, is_waiting(window))


def parked_count(session: Session) -> int:
    """Live operations whose retry waits in the database for its time (no message)."""
    return _count(session, Op.status.in_(LIVE_STATUS_VALUES), text(PARKED))


def _completed_since(since: datetime) -> tuple[ColumnElement[bool], ...]:
    # completed_at stays set when a completed operation is cancelled later: it was processed.
    return (Op.completed_at >= since, Op.operation_type == ORDER_DEDUCTION)


def processing_times(session: Session, since: datetime) -> ProcessingTimes:
    """Count, average, p95 and slowest ids of order deductions completed since ``since``."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        return _processing_times_in_sql(session, since)
    return _processing_times_in_python(session, since)


def _processing_times_in_sql(session: Session, since: datetime) -> ProcessingTimes:
    seconds = extract("epoch", Op.completed_at - Op.created_at)
    count, average, p95 = session.execute(
        select(
            func.count(),
            func.avg(seconds),
            func.percentile_cont(P95).within_group(seconds),
        ).where(*_completed_since(since))
    ).one()
    slowest = session.scalars(
        select(Op.id)
        .where(*_completed_since(since))
        .order_by(seconds.desc(), Op.id)
        .limit(SLOWEST_SAMPLE_SIZE)
    )
    return ProcessingTimes(
        count=int(count),
        avg_s=float(average or 0.0),
        p95_s=float(p95 or 0.0),
        slowest_ids=tuple(str(operation_id) for operation_id in slowest),
    )


def _processing_times_in_python(session: Session, since: datetime) -> ProcessingTimes:
    rows = session.execute(
        select(Op.id, Op.created_at, Op.completed_at).where(*_completed_since(since))
    ).all()
    durations = {
        str(operation_id): (completed_at - created_at).total_seconds()
        for operation_id, created_at, completed_at in rows
        if completed_at is not None  # never, given the filter; says so to the type checker
    }
    if not durations:
        return ProcessingTimes()
    slowest = sorted(durations, key=lambda operation_id: (-durations[operation_id], operation_id))
    return ProcessingTimes(
        count=len(durations),
        avg_s=math.fsum(durations.values()) / len(durations),
        p95_s=percentile_cont(list(durations.values()), P95),
        slowest_ids=tuple(slowest[:SLOWEST_SAMPLE_SIZE]),
    )


def percentile_cont(values: Sequence[float], fraction: float) -> float:
    """PostgreSQL's ``percentile_cont``: linear interpolation between the nearest ranks; 0 if
    there are no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = fraction * (len(ordered) - 1)
    lower, upper = math.floor(rank), math.ceil(rank)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (rank - lower)

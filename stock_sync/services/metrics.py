"""The seed's monitoring metrics, read from the database: the truth, not the broker.

:func:`collect_metrics` answers every figure with a few small indexed queries whose cost grows
with the rows of the recent window, never with the table: live statuses and terminal ones read
the (status, updated_at) index, creations the created_at index, completions the completed_at
index and errors the partial (at, error_type) index of ``operation_events``. The same code runs
on PostgreSQL and SQLite; only the processing-time percentile differs (``percentile_cont`` in
PostgreSQL, the same interpolation in Python on SQLite).

The cumulative counts (operations created, finished per status, errors per type) are read
from ``metric_counters``, a few rows raised in the transaction that writes the audit events
they count (stock_sync/adapters/operation_events.py): counting the whole table on each scrape took
about 100 ms over 1,000,000 operations, twice the target.
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, exists, extract, func, select, text
from sqlalchemy.orm import Session, aliased

from stock_sync.adapters.db import Database
from stock_sync.adapters.maintenance_runs import MARKETPLACE_AUDIT, last_runs
from stock_sync.adapters.models import (
    PARKED,
    MetricCounter,
    OperationEvent,
    PendingStockOperation,
)
from stock_sync.adapters.operation_events import (
    CREATED_COUNTER,
    ERRORS_COUNTER,
    FINISHED_COUNTER,
    PROCESSING_BUCKET_COUNTER,
    PROCESSING_SUM_MS_COUNTER,
    RETRIED_COUNTER,
    SETTLED_COUNTER,
)
from stock_sync.adapters.settings import Settings
from stock_sync.domain import errors
from stock_sync.domain.settlement import (
    COMPLETED,
    FAILED,
    INFINITY_LABEL,
    OUTCOMES,
    PROCESSING_BUCKETS_S,
    bucket_label,
)
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.services.stuck import (
    LIVE_STATUS_VALUES,
    StuckWindow,
    is_stuck,
    is_waiting,
    stuck_window,
)

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
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


def _error_type_names(root: type[Exception]) -> list[str]:
    return [
        root.__name__,
        *(name for sub in root.__subclasses__() for name in _error_type_names(sub)),
    ]


# Every error type stock-sync raises on purpose: each counter is exposed from zero, so rate()
# sees its first error instead of a series that starts at 1.
KNOWN_ERROR_TYPES = tuple(sorted(set(_error_type_names(errors.StockSyncError))))


@dataclass(frozen=True)
class MetricsSnapshot:
    """Every monitoring figure at ``generated_at``, over the last ``window_s`` seconds.

    "Finished", "settled", "created", processing times and ratios count order deductions only;
    live counts, stuck operations and errors count every operation type. Ratios are 0 when
    their denominator is 0. Sample ids are operation UUIDs as strings.
    """

    generated_at: datetime
    window_s: float
    live_by_status: Mapping[str, int] = field(default_factory=dict)
    finished_by_status: Mapping[str, int] = field(default_factory=dict)
    # Order deductions settled in the window, by outcome (stock_sync/domain/settlement.py): the
    # window's increase of the settled counters below.
    settled_in_window: Mapping[str, int] = field(default_factory=dict)
    created_in_window: int = 0
    completed_timed: int = 0
    processing_seconds_avg: float = 0.0
    processing_seconds_p95: float = 0.0
    slowest_operation_ids: tuple[str, ...] = ()
    errors_by_type: Mapping[str, int] = field(default_factory=dict)
    failed_sample_ids: tuple[str, ...] = ()
    cancelled_sample_ids: tuple[str, ...] = ()
    stuck_count: int = 0
    stuck_sample_ids: tuple[str, ...] = ()
    # Waiting their turn in the queue, and retries waiting in the database: not faults.
    waiting_count: int = 0
    parked_count: int = 0
    # Microservice rollbacks that gave up: the marketplace still shows a cancelled order's
    # fulfillment as synced, and only an operator can put it right.
    failed_rollbacks: int = 0
    failed_rollback_ids: tuple[str, ...] = ()
    queue_name: str | None = None
    queue_length: int | None = None
    # Cumulative since the database was created (metric_counters), not windowed.
    created_total: int = 0
    retried_total: int = 0
    finished_total: Mapping[str, int] = field(default_factory=dict)
    errors_total: Mapping[str, int] = field(default_factory=dict)
    settled_total: Mapping[str, int] = field(default_factory=dict)
    # The processing-time histogram: completions per bucket ("le" label, not cumulative) and
    # the sum of their processing times.
    processing_buckets: Mapping[str, int] = field(default_factory=dict)
    processing_sum_s: float = 0.0
    # None: the broker was not asked; False: it did not answer (queue_length is then None).
    broker_up: bool | None = None
    # When beat last sent an entry ("beat") and each maintenance task last succeeded, by the
    # task's name in maintenance_runs (a task added later shows up by itself).
    maintenance_last_success: Mapping[str, datetime] = field(default_factory=dict)
    # What the last marketplace audit found ("found") and left unrepaired ("unrepaired").
    marketplace_drift: Mapping[str, int] = field(default_factory=dict)

    def live(self, status: str) -> int:
        return self.live_by_status.get(status, 0)

    def finished(self, status: str) -> int:
        return self.finished_by_status.get(status, 0)

    @property
    def cancellations(self) -> int:
        return self.finished(OperationStatus.CANCELLED.value)

    @property
    def settled(self) -> int:
        """Order deductions settled within the window: the denominator of the error ratio."""
        return sum(self.settled_in_window.get(outcome, 0) for outcome in OUTCOMES)

    @property
    def error_ratio(self) -> float:
        """failed / settled order deductions within the window (the Prometheus rule's ratio of
        the increases of stock_sync_order_deductions_settled_total)."""
        return _ratio(self.settled_in_window.get(FAILED, 0), self.settled)

    @property
    def cancellation_ratio(self) -> float:
        """cancelled / created within the window (above 1 when older operations get cancelled)."""
        return _ratio(self.cancellations, self.created_in_window)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view; every status key is present, 0 included."""
        return {
            "generated_at": self.generated_at.isoformat(),
            "window_s": self.window_s,
            "operations": {status: self.live(status) for status in LIVE_STATUSES},
            "finished": {status: self.finished(status) for status in FINISHED_STATUSES},
            "settled": {outcome: self.settled_in_window.get(outcome, 0) for outcome in OUTCOMES},
            "created": self.created_in_window,
            "processing_seconds": {
                "count": self.completed_timed,
                "avg": self.processing_seconds_avg,
                "p95": self.processing_seconds_p95,
                "slowest_operation_ids": list(self.slowest_operation_ids),
            },
            "errors": dict(sorted(self.errors_by_type.items())),
            "error_ratio": self.error_ratio,
            "failed_sample_ids": list(self.failed_sample_ids),
            "cancellations": self.cancellations,
            "cancellation_ratio": self.cancellation_ratio,
            "cancelled_sample_ids": list(self.cancelled_sample_ids),
            "stuck": {
                "count": self.stuck_count,
                "sample_operation_ids": list(self.stuck_sample_ids),
            },
            "waiting": self.waiting_count,
            "parked_retries": self.parked_count,
            "failed_rollbacks": {
                "count": self.failed_rollbacks,
                "sample_operation_ids": list(self.failed_rollback_ids),
            },
            "queue": (
                {"name": self.queue_name, "length": self.queue_length}
                if self.queue_length is not None
                else None
            ),
            "totals": {
                "created": self.created_total,
                "retried": self.retried_total,
                "finished": {
                    status: self.finished_total.get(status, 0) for status in FINISHED_STATUSES
                },
                "errors": dict(sorted(self.errors_total.items())),
                "settled": {outcome: self.settled_total.get(outcome, 0) for outcome in OUTCOMES},
            },
            "marketplace_drift": dict(self.marketplace_drift),
            "maintenance_last_success": {
                task: moment.isoformat() for task, moment in self.maintenance_last_success.items()
            },
        }


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


# --- collection --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessingTimes:
    """Processing time (completed_at - created_at) of the order deductions completed lately."""

    count: int = 0
    avg_s: float = 0.0
    p95_s: float = 0.0
    slowest_ids: tuple[str, ...] = ()


def collect_metrics(
    session: Session,
    settings: Settings,
    *,
    now: datetime,
    queue_length: int | None = None,
    broker_up: bool | None = None,
) -> MetricsSnapshot:
    """Read every figure of the window ending at ``now`` (timezone-aware) in ``session``.

    Read-only. ``queue_length`` is reported under ``settings.queue_name`` when known;
    ``broker_up`` says whether the broker was asked (None) and answered.
    """
    now = now.astimezone(UTC)  # SQLite compares stored UTC text: the bound value must be UTC too
    since = now - timedelta(seconds=settings.alert_window_s)
    processing = processing_times(session, since)
    counters = counter_values(session)
    window = stuck_window(session.connection(), settings, now=now)
    return MetricsSnapshot(
        generated_at=now,
        window_s=settings.alert_window_s,
        live_by_status=live_counts(session),
        finished_by_status=finished_counts(session, since),
        settled_in_window=settled_counts(session, since),
        created_in_window=created_count(session, since),
        completed_timed=processing.count,
        processing_seconds_avg=processing.avg_s,
        processing_seconds_p95=processing.p95_s,
        slowest_operation_ids=processing.slowest_ids,
        errors_by_type=error_counts(session, since),
        failed_sample_ids=recently_finished_ids(session, OperationStatus.FAILED.value, since),
        cancelled_sample_ids=recently_finished_ids(session, OperationStatus.CANCELLED.value, since),
        stuck_count=stuck_count(session, window),
        stuck_sample_ids=stuck_ids(session, window),
        waiting_count=waiting_count(session, window),
        parked_count=parked_count(session),
        failed_rollbacks=failed_rollback_count(session),
        failed_rollback_ids=failed_rollback_ids(session),
        queue_name=settings.queue_name if queue_length is not None else None,
        queue_length=queue_length,
        created_total=counters.get(CREATED_COUNTER, {}).get("", 0),
        retried_total=counters.get(RETRIED_COUNTER, {}).get("", 0),
        finished_total=counters.get(FINISHED_COUNTER, {}),
        errors_total=counters.get(ERRORS_COUNTER, {}),
        settled_total=counters.get(SETTLED_COUNTER, {}),
        processing_buckets=counters.get(PROCESSING_BUCKET_COUNTER, {}),
        processing_sum_s=counters.get(PROCESSING_SUM_MS_COUNTER, {}).get("", 0) / 1000,
        broker_up=broker_up,
        maintenance_last_success=last_successes(session),
        marketplace_drift=marketplace_drift(session),
    )


def read_metrics(
    database: Database,
    settings: Settings,
    *,
    now: datetime,
    queue_length: int | None = None,
    broker_up: bool | None = None,
) -> MetricsSnapshot:
    """:func:`collect_metrics` in a short transaction of its own."""
    with database.transaction() as session:
        return collect_metrics(
            session, settings, now=now, queue_length=queue_length, broker_up=broker_up
        )


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
    completed = select(func.count()).where(Op.completed_at >= since, deduction)
    failed = select(func.count()).where(
        Op.status == OperationStatus.FAILED.value,
        Op.updated_at >= since,
        Op.failed_at >= since,
        deduction,
    )
    return {
        COMPLETED: int(session.scalar(completed) or 0),
        FAILED: int(session.scalar(failed) or 0),
    }


def created_count(session: Session, since: datetime) -> int:
    """Order deductions created since ``since``: the denominator of the cancellation ratio."""
    query = select(func.count()).where(Op.created_at >= since, Op.operation_type == ORDER_DEDUCTION)
    return int(session.scalar(query) or 0)


def error_counts(session: Session, since: datetime) -> dict[str, int]:
    """Error events since ``since`` by error type (the partial index holds only error rows)."""
    event = OperationEvent
    return _counts_by(session, event.error_type, event.error_type.is_not(None), event.at >= since)


def recently_finished_ids(session: Session, status: str, since: datetime) -> tuple[str, ...]:
    """The latest few order deductions that reached ``status`` since ``since``."""
    query = (
        select(Op.id)
        .where(Op.status == status, Op.updated_at >= since, Op.operation_type == ORDER_DEDUCTION)
        .order_by(Op.updated_at.desc())
        .limit(SAMPLE_SIZE)
    )
    return tuple(str(operation_id) for operation_id in session.scalars(query))


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
    query = select(func.count()).where(*_unresolved_failed_rollbacks())
    return int(session.scalar(query) or 0)


def failed_rollback_ids(session: Session) -> tuple[str, ...]:
    query = (
        select(Op.id)
        .where(*_unresolved_failed_rollbacks())
        .order_by(Op.updated_at.desc())
        .limit(SAMPLE_SIZE)
    )
    return tuple(str(operation_id) for operation_id in session.scalars(query))


def stuck_count(session: Session, window: StuckWindow) -> int:
    """Live operations whose message was lost or whose attempt died (see services.stuck)."""
    return int(session.scalar(select(func.count()).where(is_stuck(window))) or 0)


def stuck_ids(session: Session, window: StuckWindow) -> tuple[str, ...]:
    """Up to :data:`SAMPLE_SIZE` stuck operations, the longest silent first."""
    query = (
        select(Op.id)
        .where(is_stuck(window))
        .order_by(func.coalesce(Op.attempt_started_at, Op.dispatched_at))
        .limit(SAMPLE_SIZE)
    )
    return tuple(str(operation_id) for operation_id in session.scalars(query))


def waiting_count(session: Session, window: StuckWindow) -> int:
    """Live operations whose message waits in the queue (a backlog, not a fault)."""
    return int(session.scalar(select(func.count()).where(is_waiting(window))) or 0)


def parked_count(session: Session) -> int:
    """Live operations whose retry waits in the database for its time (no message)."""
    query = select(func.count()).where(Op.status.in_(LIVE_STATUS_VALUES), text(PARKED))
    return int(session.scalar(query) or 0)


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


# --- the broker ---------------------------------------------------------------------------


def queue_length(app: Any, queue_name: str) -> int | None:
    """Messages waiting in ``queue_name`` on ``app``'s broker; None when the broker does not
    answer. Never raises, and gives up at once rather than retrying a dead broker."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=0)
            channel = connection.default_channel
            return int(channel.queue_declare(queue=queue_name, passive=True).message_count)
    except Exception as error:  # a metric must not take the caller down with the broker
        # Redis keeps no key for an empty list, so an empty queue reads as a missing one.
        return 0 if "NOT_FOUND" in str(error) else None


# --- Prometheus ---------------------------------------------------------------------------


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _labelled_gauge(
    name: str, documentation: str, label: str, values: Iterable[tuple[str, float]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for label_value, value in values:
        family.add_metric([label_value], value)
    return family


def _labelled_counter(
    name: str, documentation: str, label: str, values: Iterable[tuple[str, float]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for label_value, value in values:
        family.add_metric([label_value], value)
    return family


def build_info() -> InfoMetricFamily:
    """``stock_sync_build_info``: the installed version and the Python running it."""
    try:
        version = importlib.metadata.version("stock-sync")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout never installed
        version = "unknown"
    return InfoMetricFamily(
        "stock_sync_build",
        "The stock-sync version and the Python version serving these metrics.",
        value={"version": version, "python_version": platform.python_version()},
    )


def up_gauge(name: str, documentation: str, up: bool) -> GaugeMetricFamily:
    return _gauge(name, documentation, 1 if up else 0)


def metric_families(snapshot: MetricsSnapshot) -> Iterator[Metric]:
    """The snapshot in Prometheus's conventions (names are the public contract of the alert
    rules and dashboards): cumulative counts as ``_total`` counters, so ``rate()`` and
    ``increase()`` pick the window; states as gauges."""
    yield _labelled_gauge(
        "stock_sync_operations",
        "Live operations of every type per status.",
        "status",
        ((status, snapshot.live(status)) for status in LIVE_STATUSES),
    )
    yield CounterMetricFamily(
        "stock_sync_operations_created",
        "Order deductions created (by the producer, and by retries of failed ones).",
        value=snapshot.created_total,
    )
    yield CounterMetricFamily(
        "stock_sync_operations_retried",
        "FAILED order deductions given a successor by `stock-sync retry` or retry_operation.",
        value=snapshot.retried_total,
    )
    yield _labelled_counter(
        "stock_sync_operations_finished",
        "Operations of every type that reached a final status, per status.",
        "status",
        ((status, snapshot.finished_total.get(status, 0)) for status in FINISHED_STATUSES),
    )
    yield CounterMetricFamily(
        "stock_sync_cancellations",
        "Operations cancelled (the same count as stock_sync_operations_finished_total"
        '{status="cancelled"}).',
        value=snapshot.finished_total.get(OperationStatus.CANCELLED.value, 0),
    )
    error_types = sorted(set(KNOWN_ERROR_TYPES) | set(snapshot.errors_total))
    yield _labelled_counter(
        "stock_sync_errors",
        "Error events by error type (every known type from zero).",
        "error_type",
        ((kind, snapshot.errors_total.get(kind, 0)) for kind in error_types),
    )
    yield _labelled_counter(
        "stock_sync_order_deductions_settled",
        "Order deductions whose processing ended, by outcome (completed or failed), each "
        "counted once: a later cancellation does not count it again, one cancelled before it "
        "settled is not counted. The error rate is failed / both.",
        "outcome",
        ((outcome, snapshot.settled_total.get(outcome, 0)) for outcome in OUTCOMES),
    )
    yield processing_histogram(snapshot)
    yield _gauge(
        "stock_sync_stuck_operations",
        "Live operations whose message was lost or whose attempt died (the sweep re-drives "
        "them); waiting in a backlog is not stuck.",
        snapshot.stuck_count,
    )
    yield _gauge(
        "stock_sync_waiting_operations",
        "Live operations whose message waits its turn in the queue.",
        snapshot.waiting_count,
    )
    yield _gauge(
        "stock_sync_parked_retries",
        "Live operations whose retry waits in the database for its time (no message).",
        snapshot.parked_count,
    )
    yield _gauge(
        "stock_sync_failed_rollbacks",
        "Microservice rollbacks of cancelled operations that gave up and were not run again.",
        snapshot.failed_rollbacks,
    )
    if snapshot.broker_up is not None:
        yield up_gauge(
            "stock_sync_broker_up",
            "1 when the broker answered the queue-length question, 0 when it did not.",
            snapshot.broker_up,
        )
    if snapshot.queue_length is not None and snapshot.queue_name is not None:
        yield _labelled_gauge(
            "stock_sync_queue_length",
            "Messages waiting on the broker (absent while stock_sync_broker_up is 0).",
            "queue",
            [(snapshot.queue_name, snapshot.queue_length)],
        )
    yield _labelled_gauge(
        "stock_sync_maintenance_last_success_timestamp_seconds",
        "When each maintenance task last finished without an error (recorded by the worker "
        'that ran it), and when beat last sent a scheduled entry (task="beat"), as Unix time.',
        "task",
        ((task, moment.timestamp()) for task, moment in snapshot.maintenance_last_success.items()),
    )
    yield _labelled_gauge(
        "stock_sync_marketplace_drift",
        "Operations whose order the last marketplace audit found disagreeing with them "
        '(state="found"), and those it left unrepaired (state="unrepaired").',
        "state",
        ((state, snapshot.marketplace_drift.get(state, 0)) for state in ("found", "unrepaired")),
    )
    yield _gauge(
        "stock_sync_metrics_window_seconds",
        "The window of `stock-sync stats` and of the in-app alerts (STOCK_SYNC_ALERT_WINDOW_S).",
        snapshot.window_s,
    )


def processing_histogram(snapshot: MetricsSnapshot) -> HistogramMetricFamily:
    """``stock_sync_processing_seconds``: creation-to-completion time of every completed order
    deduction, cumulative like any Prometheus histogram (``rate()`` picks the window)."""
    buckets, total = [], 0
    for bound in PROCESSING_BUCKETS_S:
        total += snapshot.processing_buckets.get(bucket_label(bound), 0)
        buckets.append((bucket_label(bound), float(total)))
    total += snapshot.processing_buckets.get(INFINITY_LABEL, 0)
    buckets.append((INFINITY_LABEL, float(total)))
    return HistogramMetricFamily(
        "stock_sync_processing_seconds",
        "Creation-to-completion time of the completed order deductions.",
        buckets=buckets,
        sum_value=snapshot.processing_sum_s,
    )


DATABASE_UP_HELP = "1 when the metrics could be read from the database, 0 when it failed."


class DatabaseCollector(Collector):
    """The stock-sync figures for a prometheus_client registry, read through ``snapshot``
    (a :class:`MetricsCache`'s ``get``) at each scrape.

    When ``snapshot`` raises ``failure`` (the database is unreachable), the scrape still
    answers: ``stock_sync_database_up 0`` and the build info, and ``on_failure`` is told."""

    def __init__(
        self,
        snapshot: Callable[[], MetricsSnapshot],
        *,
        failure: type[Exception] | tuple[type[Exception], ...] = (),
        on_failure: Callable[[Exception], None] = lambda error: None,
    ) -> None:
        self._snapshot = snapshot
        self._failure = failure
        self._on_failure = on_failure

    def describe(self) -> list[Metric]:
        return []  # registering must not run the queries

    def collect(self) -> Iterator[Metric]:
        yield build_info()
        try:
            snapshot = self._snapshot()
        except self._failure as error:
            self._on_failure(error)
            yield up_gauge("stock_sync_database_up", DATABASE_UP_HELP, False)
            return
        yield up_gauge("stock_sync_database_up", DATABASE_UP_HELP, True)
        yield from metric_families(snapshot)


MICROSERVICE_UP_HELP = (
    "1 when the microservice answered the metrics server's probe of its base URL below 500, "
    "0 when it did not answer or answered a server error."
)


class UpCollector(Collector):
    """One ``*_up`` gauge asked of ``probe`` at each scrape (a :class:`CachedProbe`'s get)."""

    def __init__(self, name: str, documentation: str, probe: Callable[[], bool]) -> None:
        self._name = name
        self._documentation = documentation
        self._probe = probe

    def describe(self) -> list[Metric]:
        return []  # registering must not probe

    def collect(self) -> Iterator[Metric]:
        yield up_gauge(self._name, self._documentation, self._probe())


def render_prometheus(snapshot: MetricsSnapshot) -> str:
    """The snapshot in Prometheus text exposition format 0.0.4, HELP and TYPE lines included."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(lambda: snapshot))
    return generate_latest(registry).decode("utf-8")


# --- caching for scrapes --------------------------------------------------------------------


class MetricsCache:
    """Shares one computation between every caller within ``max_age_s`` seconds.

    Thread-safe: concurrent callers on a stale cache wait for a single computation instead
    of each running the queries. A computation that raises leaves the cache as it was.
    """

    def __init__(
        self,
        compute: Callable[[], MetricsSnapshot],
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._compute = compute
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshot: MetricsSnapshot | None = None
        self._computed_at = 0.0

    def get(self) -> MetricsSnapshot:
        with self._lock:
            if self._snapshot is None or self._clock() - self._computed_at >= self._max_age_s:
                self._snapshot = self._compute()
                self._computed_at = self._clock()
            return self._snapshot

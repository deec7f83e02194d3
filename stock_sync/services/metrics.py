"""The seed's monitoring metrics, read from the database: the truth, not the broker.

:func:`collect_metrics` answers every figure with a few small indexed queries
(stock_sync/services/metric_reads.py) whose cost grows with the rows of the recent window,
never with the table. :class:`MetricsSnapshot` is what they found, and the ratios the alerts
judge (stock_sync/services/alerts.py); stock_sync/entrypoints/metrics_exposition.py shows it
to Prometheus.

The cumulative counts (operations created, finished per status, errors per type) are read
from ``metric_counters``, a few rows raised in the transaction that writes the audit events
they count (stock_sync/adapters/operation_events.py): counting the whole table on each scrape took
about 100 ms over 1,000,000 operations, twice the target.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from stock_sync.adapters.db import Database
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
from stock_sync.domain.settlement import FAILED, OUTCOMES
from stock_sync.domain.statuses import OperationStatus
from stock_sync.services.metric_reads import (
    FINISHED_STATUSES,
    LIVE_STATUSES,
    counter_values,
    created_count,
    error_counts,
    failed_rollback_count,
    failed_rollback_ids,
    finished_counts,
    last_successes,
    live_counts,
    marketplace_drift,
    parked_count,
    processing_times,
    recently_finished_ids,
    settled_counts,
    stuck_count,
    stuck_ids,
    waiting_count,
)
from stock_sync.services.stuck import stuck_window


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
        **cumulative_figures(counter_values(session)),
        broker_up=broker_up,
        maintenance_last_success=last_successes(session),
        marketplace_drift=marketplace_drift(session),
    )


def cumulative_figures(counters: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """The snapshot's fields read from ``metric_counters`` (cumulative, not windowed)."""
    return {
        "created_total": counters.get(CREATED_COUNTER, {}).get("", 0),
        "retried_total": counters.get(RETRIED_COUNTER, {}).get("", 0),
        "finished_total": counters.get(FINISHED_COUNTER, {}),
        "errors_total": counters.get(ERRORS_COUNTER, {}),
        "settled_total": counters.get(SETTLED_COUNTER, {}),
        "processing_buckets": counters.get(PROCESSING_BUCKET_COUNTER, {}),
        "processing_sum_s": counters.get(PROCESSING_SUM_MS_COUNTER, {}).get("", 0) / 1000,
    }


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

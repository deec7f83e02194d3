"""A :class:`MetricsSnapshot` in Prometheus's conventions, for the metrics server and tests.

The names, labels and HELP texts below are the public contract of the alert rules and the
dashboards (docker/prometheus-alerts.yml): cumulative counts are ``_total`` counters, so
``rate()`` and ``increase()`` pick the window; states are gauges. :data:`FAMILIES` lists them
in the order a scrape shows them.
"""

from __future__ import annotations

import importlib.metadata
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

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

from stock_sync.domain.settlement import (
    INFINITY_LABEL,
    OUTCOMES,
    PROCESSING_BUCKETS_S,
    bucket_label,
)
from stock_sync.domain.statuses import OperationStatus
from stock_sync.services.metric_reads import FINISHED_STATUSES, LIVE_STATUSES
from stock_sync.services.metrics import KNOWN_ERROR_TYPES, MetricsSnapshot

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"

Samples = Callable[[MetricsSnapshot], Iterable[tuple[str, float]]]


@dataclass(frozen=True)
class Family:
    """One metric family: its ``samples`` are (label value, value) pairs; with no ``label``,
    a single pair whose label value is ignored (a histogram's: its buckets, cumulative)."""

    name: str
    kind: str
    help: str
    samples: Samples
    label: str | None = None
    shown: Callable[[MetricsSnapshot], bool] = lambda snapshot: True


def _one(value: Callable[[MetricsSnapshot], float]) -> Samples:
    return lambda snapshot: [("", value(snapshot))]


def _cumulative_buckets(snapshot: MetricsSnapshot) -> list[tuple[str, float]]:
    """The processing-time buckets, each counting those below it too, as Prometheus wants."""
    buckets, total = [], 0
    for label in [*(bucket_label(bound) for bound in PROCESSING_BUCKETS_S), INFINITY_LABEL]:
        total += snapshot.processing_buckets.get(label, 0)
        buckets.append((label, float(total)))
    return buckets


def _error_samples(snapshot: MetricsSnapshot) -> Iterable[tuple[str, float]]:
    error_types = sorted(set(KNOWN_ERROR_TYPES) | set(snapshot.errors_total))
    return ((kind, snapshot.errors_total.get(kind, 0)) for kind in error_types)


FAMILIES = (
    Family(
        "stock_sync_operations",
        GAUGE,
        "Live operations of every type per status.",
        lambda s: ((status, s.live(status)) for status in LIVE_STATUSES),
        label="status",
    ),
    Family(
        "stock_sync_operations_created",
        COUNTER,
        "Order deductions created (by the producer, and by retries of failed ones).",
        _one(lambda s: s.created_total),
    ),
    Family(
        "stock_sync_operations_retried",
        COUNTER,
        "FAILED order deductions given a successor by `stock-sync retry` or retry_operation.",
        _one(lambda s: s.retried_total),
    ),
    Family(
        "stock_sync_operations_finished",
        COUNTER,
        "Operations of every type that reached a final status, per status.",
        lambda s: ((status, s.finished_total.get(status, 0)) for status in FINISHED_STATUSES),
        label="status",
    ),
    Family(
        "stock_sync_cancellations",
        COUNTER,
        "Operations cancelled (the same count as stock_sync_operations_finished_total"
        '{status="cancelled"}).',
        _one(lambda s: s.finished_total.get(OperationStatus.CANCELLED.value, 0)),
    ),
    Family(
        "stock_sync_errors",
        COUNTER,
        "Error events by error type (every known type from zero).",
        _error_samples,
        label="error_type",
    ),
    Family(
        "stock_sync_order_deductions_settled",
        COUNTER,
        "Order deductions whose processing ended, by outcome (completed or failed), each "
        "counted once: a later cancellation does not count it again, one cancelled before it "
        "settled is not counted. The error rate is failed / both.",
        lambda s: ((outcome, s.settled_total.get(outcome, 0)) for outcome in OUTCOMES),
        label="outcome",
    ),
    # Creation-to-completion time of every completed order deduction, cumulative like any
    # Prometheus histogram (rate() picks the window).
    Family(
        "stock_sync_processing_seconds",
        HISTOGRAM,
        "Creation-to-completion time of the completed order deductions.",
        _cumulative_buckets,
    ),
    Family(
        "stock_sync_stuck_operations",
        GAUGE,
        "Live operations whose message was lost or whose attempt died (the sweep re-drives "
        "them); waiting in a backlog is not stuck.",
        _one(lambda s: s.stuck_count),
    ),
    Family(
        "stock_sync_waiting_operations",
        GAUGE,
        "Live operations whose message waits its turn in the queue.",
        _one(lambda s: s.waiting_count),
    ),
    Family(
        "stock_sync_parked_retries",
        GAUGE,
        "Live operations whose retry waits in the database for its time (no message).",
        _one(lambda s: s.parked_count),
    ),
    Family(
        "stock_sync_failed_rollbacks",
        GAUGE,
        "Microservice rollbacks of cancelled operations that gave up and were not run again.",
        _one(lambda s: s.failed_rollbacks),
    ),
    Family(
        "stock_sync_broker_up",
        GAUGE,
        "1 when the broker answered the queue-length question, 0 when it did not.",
        _one(lambda s: 1 if s.broker_up else 0),
        shown=lambda s: s.broker_up is not None,
    ),
    Family(
        "stock_sync_queue_length",
        GAUGE,
        "Messages waiting on the broker (absent while stock_sync_broker_up is 0).",
        lambda s: [(s.queue_name or "", s.queue_length or 0)],
        label="queue",
        shown=lambda s: s.queue_length is not None and s.queue_name is not None,
    ),
    Family(
        "stock_sync_maintenance_last_success_timestamp_seconds",
        GAUGE,
        "When each maintenance task last finished without an error (recorded by the worker "
        'that ran it), and when beat last sent a scheduled entry (task="beat"), as Unix time.',
        lambda s: ((task, at.timestamp()) for task, at in s.maintenance_last_success.items()),
        label="task",
    ),
    Family(
        "stock_sync_marketplace_drift",
        GAUGE,
        "Operations whose order the last marketplace audit found disagreeing with them "
        '(state="found"), and those it left unrepaired (state="unrepaired").',
        lambda s: ((state, s.marketplace_drift.get(state, 0)) for state in ("found", "unrepaired")),
        label="state",
    ),
    Family(
        "stock_sync_metrics_window_seconds",
        GAUGE,
        "The window of `stock-sync stats` and of the in-app alerts (STOCK_SYNC_ALERT_WINDOW_S).",
        _one(lambda s: s.window_s),
    ),
)


def family_of(family: Family, snapshot: MetricsSnapshot) -> Metric:
    """``family``'s prometheus_client metric, its samples read from ``snapshot``."""
    if family.kind == HISTOGRAM:
        histogram = HistogramMetricFamily(family.name, family.help, labels=[])
        histogram.add_metric([], list(family.samples(snapshot)), snapshot.processing_sum_s)
        return histogram
    kind = GaugeMetricFamily if family.kind == GAUGE else CounterMetricFamily
    labels = [family.label] if family.label is not None else []
    metric = kind(family.name, family.help, labels=labels)
    for label_value, value in family.samples(snapshot):
        metric.add_metric([label_value] if labels else [], value)
    return metric


def metric_families(snapshot: MetricsSnapshot) -> Iterator[Metric]:
    """The snapshot as the families of :data:`FAMILIES` it shows."""
    return (family_of(family, snapshot) for family in FAMILIES if family.shown(snapshot))


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
    return GaugeMetricFamily(name, documentation, value=1 if up else 0)


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

T = TypeVar("T")


class TimedCache(Generic[T]):
    """Shares one computation between every caller within ``max_age_s`` seconds.

    Thread-safe: concurrent callers on a stale cache (and those arriving while it computes)
    wait for a single computation instead of each running it. A computation that raises
    leaves the cache as it was.
    """

    def __init__(
        self,
        compute: Callable[[], T],
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._compute = compute
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._value: T | None = None
        self._computed_at = 0.0

    def get(self) -> T:
        with self._lock:
            if self._value is None or self._clock() - self._computed_at >= self._max_age_s:
                self._value = self._compute()
                self._computed_at = self._clock()
            return self._value


# The snapshot of the database's figures, shared by the scrapes within STOCK_SYNC_METRICS_CACHE_S.
MetricsCache = TimedCache[MetricsSnapshot]
# A reachability probe (stock_sync_microservice_up), run at most once every so often.
CachedProbe = TimedCache[bool]

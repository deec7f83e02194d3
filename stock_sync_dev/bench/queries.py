"""The queries on a big table: 1,000,000 finished operations (spread over 30 days, so the
metrics' one-hour window holds ~1,400 of them) bulk-inserted with ``generate_series``, then
VACUUM ANALYZE; the median time of a stuck sweep round and of ``collect_metrics`` and whether
the sweep's query plan uses the (status, ...) index."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, text

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import PendingStockOperation, utcnow
from stock_sync.adapters.settings import Settings
from stock_sync.composition import build_services
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.statuses import OperationStatus
from stock_sync.services.metrics import collect_metrics
from stock_sync.services.stuck import is_stuck, stuck_window
from stock_sync.services.sweeps import StuckOperationSweeper
from stock_sync_dev.bench.harness import reset_tables, say

ACCOUNT = "bench-shop"
ROWS_SPREAD_S = 30 * 86_400  # the finished operations are spread over the last 30 days
SWEEP_INDEX = "ix_pending_stock_operations_status_"  # status_dispatched_at, status_attempt_...

_INSERT_FINISHED = """
INSERT INTO pending_stock_operations (
    id, order_id, account_name, operation_type, status, line_items, order_revision, retry_count,
    created_at, updated_at, line_items_loaded_at, stock_deducted_at, microservice_synced_at,
    completed_at, failed_at, cancelled_at, cancelled_by, cancellation_reason,
    fulfillment_status_before_sync, last_error, last_error_type)
SELECT gen_random_uuid(), 'bench-q-' || g, :account, 'order_deduction',
       CASE g % 20 WHEN 0 THEN 'failed' WHEN 1 THEN 'cancelled' ELSE 'completed' END,
       json_build_array(json_build_object('id', 'bench-q-' || g || '-1',
           'offer_id', 'offer-SKU-' || g % 1000, 'sku', 'SKU-' || g % 1000, 'quantity', 1)),
       '1', 0, t, t + interval '2 seconds', t + interval '0.5 seconds',
       CASE WHEN g % 20 <> 0 THEN t + interval '1 second' END,
       CASE WHEN g % 20 <> 0 THEN t + interval '1.5 seconds' END,
       CASE WHEN g % 20 <> 0 THEN t + interval '1.5 seconds' END,
       CASE WHEN g % 20 = 0 THEN t + interval '2 seconds' END,
       CASE WHEN g % 20 = 1 THEN t + interval '2 seconds' END,
       CASE WHEN g % 20 = 1 THEN 'shop' END,
       CASE WHEN g % 20 = 1 THEN 'customer asked' END,
       CASE WHEN g % 20 <> 0 THEN 'NEW' END,
       CASE WHEN g % 20 = 0 THEN 'insufficient stock' END,
       CASE WHEN g % 20 = 0 THEN 'InsufficientStock' END
FROM (SELECT g, now() - make_interval(secs => g * :spacing) AS t
      FROM generate_series(1, :rows) AS g) AS numbered
"""

_INSERT_ERROR_EVENTS = """
INSERT INTO operation_events (operation_id, action, from_status, to_status, error_type, at)
SELECT id, :action, 'processing', 'failed', last_error_type, failed_at
FROM pending_stock_operations WHERE status = 'failed'
"""

# What the producer and the stages would have counted in metric_counters for those rows.
_INSERT_COUNTERS = """
INSERT INTO metric_counters (name, label, shard, value)
SELECT 'operations_created', '', 0, count(*) FROM pending_stock_operations
UNION ALL
SELECT 'operations_finished', status, 0, count(*) FROM pending_stock_operations GROUP BY status
UNION ALL
SELECT 'errors', error_type, 0, count(*) FROM operation_events
WHERE error_type IS NOT NULL GROUP BY error_type
ON CONFLICT (name, label, shard) DO UPDATE SET value = metric_counters.value + excluded.value
"""


def load_finished_operations(database: Database, rows: int) -> None:
    """``rows`` finished order deductions (90% completed, 5% failed, 5% cancelled) spread over
    the last 30 days, one error event per failed one; then VACUUM ANALYZE, as autovacuum
    would have done on a table that size."""
    with database.transaction() as session:
        session.execute(
            text(_INSERT_FINISHED),
            {"account": ACCOUNT, "rows": rows, "spacing": ROWS_SPREAD_S / rows},
        )
        session.execute(text(_INSERT_ERROR_EVENTS), {"action": LogAction.OPERATION_FAILED.value})
        session.execute(text(_INSERT_COUNTERS))
    with database.engine.connect() as connection:
        autocommit = connection.execution_options(isolation_level="AUTOCOMMIT")
        autocommit.execute(text("VACUUM ANALYZE pending_stock_operations"))
        autocommit.execute(text("VACUUM ANALYZE operation_events"))


class _NoDispatch:
    """A dispatcher that enqueues nothing: the timed sweep must not put work on a broker."""

    def enqueue_pipeline(
        self, operation_id: uuid.UUID, status: OperationStatus, generation: int
    ) -> None:
        return None

    def enqueue_pipelines(self, dispatches: Sequence[Any], on_published: Any = None) -> None:
        return None

    def enqueue_rollback(self, adjustment_operation_id: uuid.UUID, generation: int) -> None:
        return None

    def enqueue_probe(self, probe_id: int) -> None:
        return None


def median_ms(action: Callable[[], object], runs: int) -> float:
    """The median wall time of ``runs`` calls of ``action`` after one untimed warm-up call."""
    action()
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def explain_sweep_query(database: Database, settings: Settings) -> str:
    """EXPLAIN ANALYZE of the sweep's candidate query (the statement of
    ``StuckOperationSweeper._candidates``, built from the same ``is_stuck`` predicate)."""
    op = PendingStockOperation
    with database.engine.connect() as connection:
        window = stuck_window(connection, settings)
        statement = (
            select(op.id)
            .where(is_stuck(window))
            .order_by(func.coalesce(op.attempt_started_at, op.dispatched_at))
            .limit(settings.sweep_batch_size)
        )
        compiled = statement.compile(
            dialect=connection.dialect, compile_kwargs={"render_postcompile": True}
        )
        plan = connection.exec_driver_sql(
            f"EXPLAIN (ANALYZE, BUFFERS) {compiled}", compiled.params
        ).scalars()
        lines = [str(line) for line in plan]
        connection.rollback()
    return "\n".join(lines)


@dataclass(frozen=True)
class QueryTimings:
    rows: int
    load_s: float
    sweep_ms: float
    metrics_ms: float
    sweep_plan: str
    stuck_found: int

    @property
    def sweep_uses_index(self) -> bool:
        return SWEEP_INDEX in self.sweep_plan


def query_phase(database: Database, settings: Settings, rows: int, runs: int) -> QueryTimings:
    """Load ``rows`` finished operations, then time the sweep round and the metrics."""
    reset_tables(database)
    started = time.monotonic()
    load_finished_operations(database, rows)
    load_s = time.monotonic() - started
    say(f"    loaded {rows:,} finished operations in {load_s:.1f} s (VACUUM ANALYZE included)")
    dispatcher = _NoDispatch()
    services = build_services(settings, dispatcher=dispatcher, database=database)
    sweeper = StuckOperationSweeper(
        database=database,
        settings=settings,
        dispatcher=dispatcher,
        synchronization=services.synchronization,
        logger=services.logger,
    )
    stuck: list[int] = []

    def sweep() -> None:
        report = sweeper.sweep(now=utcnow())
        stuck.append(len(report.redriven) + len(report.failed) + len(report.not_enqueued))

    def metrics() -> None:
        with database.transaction() as session:
            collect_metrics(session, settings, now=datetime.now(UTC))

    sweep_ms = median_ms(sweep, runs)
    metrics_ms = median_ms(metrics, runs)
    say(f"    sweep median {sweep_ms:.2f} ms, metrics median {metrics_ms:.2f} ms ({runs} runs)")
    return QueryTimings(
        rows=rows,
        load_s=load_s,
        sweep_ms=sweep_ms,
        metrics_ms=metrics_ms,
        sweep_plan=explain_sweep_query(database, settings),
        stuck_found=sum(stuck),
    )

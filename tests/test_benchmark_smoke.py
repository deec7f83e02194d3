"""``python -m stock_sync.devtools.benchmark --quick --json`` runs end to end against the real
PostgreSQL and Redis: it exits 0, reports every metric as a number, oversells nothing and leaves a
ledger that sums; the costs it measures (CPU by process, SQL statements, transactions and HTTP
requests per operation, latency percentiles, the worker's memory) are present and sane. No
speed is asserted: the targets are measured by the benchmark, never by a test.

The measuring helpers (``/proc`` readers, the least-squares slope, the SQL counters of
``stock_sync.adapters.instrumentation``) are checked on their own, quickly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from stock_sync.adapters import instrumentation
from stock_sync.devtools.benchmark import (
    LatencyRun,
    least_squares_slope,
    parse_options,
    read_stat,
    vm_rss_bytes,
)

REPOSITORY = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600  # a guard against a hang, not a speed check: a loaded machine takes its time

METRICS = {
    "baseline_chains_per_s",
    "pipeline_ops_per_s",
    "pipeline_vs_baseline",
    "pipeline_not_completed",
    "distinct_skus_ops_per_s",
    "hot_sku_ops_per_s",
    "hot_vs_distinct",
    "contention_not_completed",
    "oversold_units",
    "hot_sku_lowest_level_seen",
    "hot_sku_final_level",
    "ledger_mismatches",
    "deduction_rows",
    "finished_operations_loaded",
    "bulk_load_s",
    "stuck_sweep_ms",
    "metrics_query_ms",
    "sweep_uses_status_index",
    "sweep_found_stuck",
}
CPU_PARTS = (
    "worker_parent",
    "worker_children",
    "postgres_worker",
    "postgres_benchmark",
    "postgres_server",
    "redis",
    "benchmark",
    "total",
)
COUNTED = {
    "pipeline_retries_scheduled",
    "pipeline_sql_statements_per_op",
    "pipeline_transactions_per_op",
    "pipeline_producer_statements_per_op",
    "pipeline_producer_transactions_per_op",
    "pipeline_http_requests_per_op",
    "pipeline_http_gets_per_op",
    "pipeline_http_puts_per_op",
}
LATENCY = {
    "latency_offered_ops_per_s",
    "latency_max_submit_lag_ms",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "latency_not_completed",
    "latency_retries_scheduled",
}
SOAK = {
    "soak_operations",
    "soak_ops_per_s",
    "soak_not_completed",
    "soak_worker_rss_after_warm_up_mb",
    "soak_worker_rss_end_mb",
    "soak_worker_rss_slope",
    "soak_worker_parent_rss_slope",
    "soak_worker_children_rss_slope",
}
NEW_METRICS = (
    {f"{phase}_cpu_{part}" for phase in ("baseline", "pipeline") for part in CPU_PARTS}
    | COUNTED
    | LATENCY
    | SOAK
)


def run_quick_benchmark() -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "stock_sync.devtools.benchmark", "--quick", "--json"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
def test_the_quick_benchmark_reports_every_metric_and_never_oversells() -> None:
    report = run_quick_benchmark()
    values = {metric["name"]: metric["value"] for metric in report["metrics"]}

    assert set(values) >= METRICS | NEW_METRICS
    assert {name for name, value in values.items() if not is_number(value)} == set()
    orders = report["options"]["orders"]
    assert values["pipeline_not_completed"] == 0
    assert values["contention_not_completed"] == 0
    assert values["oversold_units"] == 0
    assert values["hot_sku_lowest_level_seen"] >= 0
    assert values["hot_sku_final_level"] == 0  # stocked with exactly what the orders took
    assert values["ledger_mismatches"] == 0
    assert values["deduction_rows"] == 2 * orders  # one per order, distinct and hot runs
    assert values["finished_operations_loaded"] == report["options"]["rows"]

    # task events: asked off by default, and what celeryconfig made of it is reported
    assert report["options"]["task_events"] == "off"
    assert set(report["task_events_effective"]) == {
        "worker_send_task_events",
        "task_send_sent_event",
    }

    # CPU by process: never negative; the worker and the whole run did spend some
    for phase in ("baseline", "pipeline"):
        assert all(values[f"{phase}_cpu_{part}"] >= 0 for part in CPU_PARTS)
        assert values[f"{phase}_cpu_worker_parent"] + values[f"{phase}_cpu_worker_children"] > 0
        assert values[f"{phase}_cpu_total"] > 0
    assert values["pipeline_cpu_postgres_worker"] > 0  # the pipeline does talk to PostgreSQL

    # counted, not estimated: whole numbers of requests, consistent with each other
    assert values["pipeline_sql_statements_per_op"] > 0
    assert values["pipeline_transactions_per_op"] > 0
    assert values["pipeline_producer_statements_per_op"] > 0
    assert values["pipeline_producer_transactions_per_op"] > 0
    assert values["pipeline_http_gets_per_op"] > 0
    assert values["pipeline_http_puts_per_op"] > 0
    assert math.isclose(
        values["pipeline_http_requests_per_op"],
        values["pipeline_http_gets_per_op"] + values["pipeline_http_puts_per_op"],
    )
    http_requests = values["pipeline_http_requests_per_op"] * orders
    assert math.isclose(http_requests, round(http_requests))

    # latency: a separate open-loop phase, percentiles in order
    assert values["latency_not_completed"] == 0
    assert values["latency_offered_ops_per_s"] > 0
    assert 0 < values["latency_p50_ms"] <= values["latency_p95_ms"] <= values["latency_p99_ms"]

    # soak (a small one with --quick): memory sampled, a slope fitted (its sign is noise)
    assert values["soak_operations"] == report["options"]["soak"] > 0
    assert values["soak_not_completed"] == 0
    assert values["soak_worker_rss_after_warm_up_mb"] > 0
    assert values["soak_worker_rss_end_mb"] > 0
    samples = report["soak_rss_samples"]
    assert samples[0]["operations"] == 0
    assert samples[-1]["operations"] == values["soak_operations"]
    assert all(s["parent_bytes"] > 0 and s["children_bytes"] > 0 for s in samples)
    assert report["notes"]


# --- the measuring helpers, without a worker -------------------------------------------------


def test_read_stat_and_rss_see_this_process() -> None:
    stat = read_stat(os.getpid())
    assert stat is not None
    assert stat.pid == os.getpid()
    assert stat.ppid == os.getppid()
    assert stat.ticks >= 0 and stat.reaped_ticks >= 0 and stat.start > 0
    assert vm_rss_bytes(os.getpid()) > 0
    assert read_stat(2**22 + 1) is None  # above any pid_max: no such process


def test_least_squares_slope() -> None:
    assert least_squares_slope([(0, 1.0), (1, 3.0), (2, 5.0)]) == pytest.approx(2.0)
    assert least_squares_slope([(0, 5.0), (10, 5.0)]) == 0.0
    assert least_squares_slope([(3, 5.0)]) == 0.0  # one point: no slope


def test_latency_percentiles_are_nearest_rank() -> None:
    run = LatencyRun(100, 100, 1.0, 0.0, [float(ms) for ms in range(100, 0, -1)], {})
    assert run.percentile(0.50) == 50.0
    assert run.percentile(0.95) == 95.0
    assert run.percentile(0.99) == 99.0


def test_options_quick_sizes_and_the_soak_switches() -> None:
    quick = parse_options(["--quick"])
    assert quick.soak > 0 and quick.task_events == "off" and not quick.soak_only
    assert parse_options([]).soak == 0
    assert parse_options(["--soak-only"]).soak == 20_000
    assert parse_options(["--task-events", "on", "--soak", "10"]).task_events == "on"


def test_sql_counters_count_per_process_only_when_asked(tmp_path: Path) -> None:
    folder = tmp_path / "counts"
    assert not instrumentation.count_sql_if_asked({})
    assert instrumentation.count_sql_if_asked({instrumentation.COUNT_SQL_DIR_VARIABLE: str(folder)})
    engine = create_engine("sqlite://")
    try:
        with engine.begin() as connection:
            connection.execute(text("SELECT 1"))
            connection.execute(text("SELECT 2"))
        child = os.fork()
        if child == 0:  # a forked child counts into a file of its own
            try:
                engine.dispose(close=False)
                with engine.connect() as connection:
                    connection.execute(text("SELECT 3"))
                    connection.rollback()
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        counts = instrumentation.read_count_files(folder)
        assert counts[os.getpid()] == instrumentation.SqlCounts(statements=2, commits=1)
        assert counts[child] == instrumentation.SqlCounts(statements=1, rollbacks=1)
        assert instrumentation.total(counts).transactions == 2

        labelled = instrumentation.LabelledSqlCounter(engine.url.database)
        instrumentation.install(labelled)
        with labelled.labelled("producer"), engine.begin() as connection:
            connection.execute(text("SELECT 4"))
        with engine.begin() as connection:
            connection.execute(text("SELECT 5"))
        assert labelled.counts() == {
            "producer": instrumentation.SqlCounts(statements=1, commits=1),
            "other": instrumentation.SqlCounts(statements=1, commits=1),
        }
    finally:
        instrumentation.uninstall()
        engine.dispose()

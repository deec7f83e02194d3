"""``python -m stock_sync_dev.benchmark --quick --json`` runs end to end against the real
PostgreSQL and Redis: it exits 0, reports the headline ratio and every metric as a number,
oversells nothing and leaves a ledger that sums; the costs it measures (CPU by process, SQL
statements, transactions and HTTP requests per operation, latency percentiles, the worker's
memory) are present and sane. No speed is asserted: the targets are measured by the benchmark,
never by a test (nor does the benchmark wait fixed times: it runs in about a minute).

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
from stock_sync_dev.bench import profiling
from stock_sync_dev.bench.cli import parse_options
from stock_sync_dev.bench.phases import LatencyRun
from stock_sync_dev.bench.procstat import least_squares_slope, read_stat, vm_rss_bytes
from tasks.app import app

REPOSITORY = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600  # a guard against a hang, not a speed check: a loaded machine takes its time

METRICS = {
    "bare_chain_per_s",
    "pipeline_ops_per_s",
    "pipeline_vs_bare_chain",
    "pipeline_not_completed",
    "pipeline_orders_submitted_per_s",
    "batch_orders_submitted_per_s",
    "batch_ops_per_s",
    "batch_not_completed",
    "counted_not_completed",
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
    "worker_main",
    "worker_pool",
    "producer",
    "postgres_worker",
    "postgres_producer",
    "postgres_server",
    "redis",
    "fake",
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
    {f"{phase}_cpu_{part}" for phase in ("bare_chain", "pipeline", "batch") for part in CPU_PARTS}
    | COUNTED
    | LATENCY
    | SOAK
)


def run_quick_benchmark() -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "stock_sync_dev.benchmark", "--quick", "--json"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report: dict[str, Any] = json.loads(result.stdout)
    report["stderr"] = result.stderr
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
    counted = report["options"]["counted"]
    assert report["headline"].startswith("benchmark: pipeline ")
    assert f"({orders:,} orders, producer one by one, worker -c 2, 20 SKUs)" in report["headline"]
    assert report["stderr"].count(report["headline"]) >= 1
    assert values["pipeline_vs_bare_chain"] == pytest.approx(
        values["pipeline_ops_per_s"] / values["bare_chain_per_s"]
    )
    assert values["pipeline_not_completed"] == 0
    assert values["batch_not_completed"] == 0 and values["counted_not_completed"] == 0
    assert values["contention_not_completed"] == 0
    assert values["oversold_units"] == 0
    assert values["hot_sku_lowest_level_seen"] >= 0
    assert values["hot_sku_final_level"] == 0  # stocked with exactly what the orders took
    assert values["ledger_mismatches"] == 0
    contention = report["options"]["contention"]
    assert values["deduction_rows"] == 2 * contention  # one per order, distinct and hot runs
    assert values["finished_operations_loaded"] == report["options"]["rows"]

    # task events: asked off by default, and what celeryconfig made of it is reported
    assert report["options"]["task_events"] == "off"
    assert set(report["task_events_effective"]) == {
        "worker_send_task_events",
        "task_send_sent_event",
    }

    # CPU by process: never negative; the worker, the producer and the whole run did spend some
    for phase in ("bare_chain", "pipeline", "batch"):
        assert all(values[f"{phase}_cpu_{part}"] >= 0 for part in CPU_PARTS)
        assert values[f"{phase}_cpu_worker_main"] + values[f"{phase}_cpu_worker_pool"] > 0
        assert values[f"{phase}_cpu_producer"] > 0
        assert values[f"{phase}_cpu_total"] > 0
    for phase in ("pipeline", "batch"):  # they do talk to PostgreSQL and the fake
        assert values[f"{phase}_cpu_postgres_worker"] > 0
        assert values[f"{phase}_cpu_fake"] > 0

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
    http_requests = values["pipeline_http_requests_per_op"] * counted
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


def test_the_bare_chain_tasks_are_not_on_the_production_app() -> None:
    """Only the benchmark's worker loads them (--include): importing the benchmark does not."""
    import stock_sync_dev.benchmark  # noqa: F401

    assert not {name for name in app.tasks if name.startswith("stock_sync.benchmark.")}


def test_the_profile_summary_splits_samples_by_library_and_by_what_they_pass_through(
    tmp_path: Path,
) -> None:
    (tmp_path / "worker-pool-11.txt").write_text(
        "main (celery/app/trace.py:1);execute (sqlalchemy/engine/base.py:2);"
        "do_execute (sqlalchemy/engine/default.py:3) 6\n"
        "main (celery/app/trace.py:1);info (logging/__init__.py:4);"
        "format (pythonjsonlogger/core.py:5) 3\n"
    )
    (tmp_path / "worker-pool-12.txt").write_text("main (celery/app/trace.py:1) 1\n")

    summary = profiling.summarise_folder(tmp_path)

    assert summary.startswith("worker-pool: 10 samples")  # both pool processes merged
    assert " 60.0%  SQLAlchemy" in summary and " 30.0%  logging, JSON logger" in summary
    assert "100.0%  Celery: receiving, tracing, acking a task" in summary
    assert " 30.0%  JSON log formatting" in summary


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
    full = parse_options([])
    assert (full.orders, full.soak, full.ratio_only, full.profile) == (2000, 0, False, None)
    assert parse_options(["--ratio-only", "--profile", "p"]).profile == "p"
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
        # a statement in autocommit is a transaction of its own
        with engine.connect() as connection:
            autocommit = connection.execution_options(isolation_level="AUTOCOMMIT")
            autocommit.execute(text("SELECT 6"))
        counts = instrumentation.read_count_files(folder)
        assert counts[os.getpid()] == instrumentation.SqlCounts(
            statements=3, commits=1, autocommits=1
        )

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

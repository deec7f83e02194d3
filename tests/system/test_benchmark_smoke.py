"""``python -m stock_sync_dev.benchmark --quick --json`` runs end to end against the real
PostgreSQL and Redis: it exits 0, reports the headline ratio and every metric as a number,
oversells nothing and leaves a ledger that sums; the costs it measures (CPU by process, SQL
statements, transactions and HTTP requests per operation, latency percentiles, the worker's
memory) are present and sane. No speed is asserted: the targets are measured by the benchmark,
never by a test (nor does the benchmark wait fixed times: it runs in about a minute).

The measuring helpers are checked on their own, quickly: tests/unit/test_benchmark_measures.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
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

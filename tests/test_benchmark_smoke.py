"""``python -m stock_sync.benchmark --quick --json`` runs end to end against the real PostgreSQL
and Redis: it exits 0, reports every metric as a number, oversells nothing and leaves a ledger
that sums. No speed is asserted: the targets are measured by the benchmark, never by a test."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240

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


def run_quick_benchmark() -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "stock_sync.benchmark", "--quick", "--json"],
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

    assert set(values) >= METRICS
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

"""The results: metrics with their targets, the headline, the CPU table, and how each figure
was measured."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from stock_sync_dev.bench.phases import (
    HOT_SKU,
    SOAK_WARM_UP_SHARE,
    CountedRun,
    LatencyRun,
    PipelineRun,
    RatioRun,
    SoakRun,
    StockCheck,
)
from stock_sync_dev.bench.procstat import CPU_LABELS, CPU_PARTS, CpuUse, RssSample
from stock_sync_dev.bench.queries import SWEEP_INDEX, QueryTimings


@dataclass(frozen=True)
class Target:
    """``value <op> bound`` must hold for the target to be met."""

    op: Literal[">=", "<", "=="]
    bound: float

    def met(self, value: float) -> bool:
        if self.op == ">=":
            return value >= self.bound
        if self.op == "<":
            return value < self.bound
        return value == self.bound


@dataclass(frozen=True)
class Metric:
    """One measured figure; ``target`` None means informational."""

    name: str
    value: float
    unit: str
    target: Target | None = None
    note: str = ""

    @property
    def passed(self) -> bool | None:
        return None if self.target is None else self.target.met(self.value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "target": None
            if self.target is None
            else {"op": self.target.op, "value": self.target.bound},
            "passed": self.passed,
            "note": self.note,
        }


def none_allowed(name: str, value: float, unit: str, note: str = "") -> Metric:
    """A count that must be zero (lost work, oversold units, mismatches...)."""
    return Metric(name, value, unit, Target("==", 0), note=note)


def _format(value: float, unit: str) -> str:
    if unit == "ratio":
        return f"{value * 100:.1f}%"
    if unit in ("ms", "s"):
        return f"{value:.2f} {unit}"
    if unit in ("chains/s", "ops/s", "orders/s"):
        return f"{value:.1f} {unit}"
    if unit == "yes/no":
        return "yes" if value else "no"
    if "/op" in unit or "/chain" in unit or unit.startswith("MB"):
        return f"{value:.2f} {unit}"
    shown = f"{int(value):,}" if float(value).is_integer() else f"{value:g}"
    return shown + (f" {unit}" if unit else "")


def _format_target(metric: Metric) -> str:
    target = metric.target
    if target is None:
        return "-"
    return f"{target.op} {_format(target.bound, metric.unit)}"


def text_table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """``rows`` (the first is the header) aligned, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([line(rows[0]), line(["-" * w for w in widths]), *map(line, rows[1:])])


def results_table(metrics: Sequence[Metric]) -> str:
    """The results as an aligned text table: name, value, target, result (ok/MISSED/info)."""
    rows = [("metric", "value", "target", "result")]
    for metric in metrics:
        verdict = {None: "info", True: "ok", False: "MISSED"}[metric.passed]
        rows.append(
            (metric.name, _format(metric.value, metric.unit), _format_target(metric), verdict)
        )
    return text_table(rows)


def missed(metrics: Sequence[Metric]) -> list[Metric]:
    return [metric for metric in metrics if metric.passed is False]


# --- the headline and the CPU table ---------------------------------------------------------


def headline(ratio: RatioRun, concurrency: int) -> str:
    """The first line: ``benchmark: pipeline X ops/s / bare chain Y chains/s = R (...)``."""
    return (
        f"benchmark: pipeline {ratio.pipeline.ops_per_s:.1f} ops/s / bare chain "
        f"{ratio.bare.chains_per_s:.1f} chains/s = {ratio.ratio:.2f} ({ratio.orders:,} orders, "
        f"producer one by one, worker -c {concurrency}, {ratio.skus} SKUs)"
    )


def cpu_table(columns: Sequence[tuple[str, CpuUse, int]]) -> str:
    """CPU milliseconds per chain / operation by process, one column per run (title, use,
    count)."""
    rows: list[list[str]] = [["CPU ms per chain / operation", *(title for title, _, _ in columns)]]
    for part in (*CPU_PARTS, "total"):
        rows.append(
            [CPU_LABELS[part], *(f"{use.per(part, count):.2f}" for _, use, count in columns)]
        )
    return text_table(rows, right=range(1, len(columns) + 1))


# --- metrics of each phase --------------------------------------------------------------------


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def cpu_metrics(phase: str, use: CpuUse, count: int, unit: str) -> list[Metric]:
    """CPU milliseconds per chain / operation of a run, by process (group)."""
    notes = {
        "worker_pool": f"{use.pool_alive} pool processes alive at the end, plus any that exited",
        "postgres_worker": f"backends: {use.backends_kept} there at both ends, "
        f"{use.backends_born} connected during the run, {use.backends_gone} gone (CPU lost); "
        f"other backends (the harness's polling, autovacuum): "
        f"{use.postgres_other_ms / max(count, 1):.2f} {unit}",
        "redis": "the redis-server process (shared with anything else using it)",
        "total": "the rows above: worker, producer, their PostgreSQL backends, Redis, the fake",
    }
    metrics = [
        Metric(f"{phase}_cpu_{part}", use.per(part, count), unit, note=notes.get(part, ""))
        for part in (*CPU_PARTS, "total")
    ]
    if use.postgres_server_ms is not None:
        metrics.append(
            Metric(
                f"{phase}_cpu_postgres_server",
                use.postgres_server_ms / max(count, 1),
                unit,
                note="every process of the PostgreSQL server, any database: meaningful only "
                "if nothing else uses the server",
            )
        )
    return metrics


def ratio_metrics(ratio: RatioRun) -> list[Metric]:
    pipeline = ratio.pipeline
    return [
        Metric(
            "bare_chain_per_s",
            ratio.bare.chains_per_s,
            "chains/s",
            note="4 no-op tasks chained with canvas, sent one by one by a producer process",
        ),
        Metric(
            "pipeline_ops_per_s",
            pipeline.ops_per_s,
            "ops/s",
            note=f"{ratio.orders} orders, {ratio.skus} SKUs, submit_operation one by one from "
            "a producer process; first submit to the last operation terminal",
        ),
        Metric("pipeline_vs_bare_chain", ratio.ratio, "ratio", Target(">=", 0.60)),
        none_allowed("pipeline_not_completed", pipeline.not_completed, "ops"),
        Metric(
            "pipeline_orders_submitted_per_s",
            pipeline.producer.submit_rate,
            "orders/s",
            note="how fast the producer submitted them, one by one",
        ),
        *cpu_metrics("bare_chain", ratio.bare.cpu, ratio.bare.chains, "ms/chain"),
        *cpu_metrics("pipeline", pipeline.cpu, pipeline.submitted, "ms/op"),
    ]


def batch_metrics(batch: PipelineRun) -> list[Metric]:
    return [
        Metric(
            "batch_orders_submitted_per_s",
            batch.producer.submit_rate,
            "orders/s",
            note=f"{batch.submitted} orders in one submit_operations call (one transaction, "
            "one broker connection)",
        ),
        Metric(
            "batch_ops_per_s",
            batch.ops_per_s,
            "ops/s",
            note="end to end: the call's start to the last operation terminal",
        ),
        none_allowed("batch_not_completed", batch.not_completed, "ops"),
        *cpu_metrics("batch", batch.cpu, batch.submitted, "ms/op"),
    ]


def counted_metrics(counted: CountedRun) -> list[Metric]:
    """SQL statements, transactions and HTTP requests per operation."""
    ops = max(counted.run.submitted, 1)
    worker, producer, monitor = counted.worker_sql, counted.producer_sql, counted.monitor_sql
    requests = sum(counted.http.values())
    return [
        Metric("counted_operations", counted.run.submitted, "ops"),
        none_allowed("counted_not_completed", counted.run.not_completed, "ops"),
        retries_metric("pipeline_retries_scheduled", counted.retries),
        Metric(
            "pipeline_sql_statements_per_op",
            worker.statements / ops,
            "stmts/op",
            note="sent by the worker processes (SQLAlchemy before_cursor_execute; psycopg2's "
            "BEGIN and the COMMIT not included)",
        ),
        Metric(
            "pipeline_transactions_per_op",
            worker.transactions / ops,
            "xacts/op",
            note=f"the worker's: {worker.commits / ops:.2f} committed, "
            f"{worker.rollbacks / ops:.2f} rolled back, {worker.autocommits / ops:.2f} "
            "statements in autocommit (each its own transaction)",
        ),
        Metric(
            "pipeline_producer_statements_per_op",
            producer.statements / ops,
            "stmts/op",
            note=f"submit_operation in the producer process; the harness's polling sent "
            f"{monitor.statements} statements in {monitor.transactions} transactions, not "
            "counted here",
        ),
        Metric("pipeline_producer_transactions_per_op", producer.transactions / ops, "xacts/op"),
        Metric(
            "pipeline_http_requests_per_op",
            requests / ops,
            "req/op",
            note="contract requests the fake microservice served (its admin API)",
        ),
        Metric("pipeline_http_gets_per_op", counted.http.get("GET", 0) / ops, "req/op"),
        Metric(
            "pipeline_http_puts_per_op",
            counted.http.get("PUT", 0) / ops,
            "req/op",
            note=f"the fake applied {counted.applied_puts} PUTs",
        ),
    ]


def retries_metric(name: str, retries: dict[str, int]) -> Metric:
    kinds = ", ".join(f"{kind}: {count}" for kind, count in sorted(retries.items()))
    return Metric(
        name,
        sum(retries.values()),
        "retries",
        note="retry_scheduled events (no fault injected)" + (f"; {kinds}" if kinds else ""),
    )


def latency_metrics(latency: LatencyRun) -> list[Metric]:
    where = f"{latency.submitted} operations submitted open loop at {latency.rate:.1f}/s"
    return [
        Metric(
            "latency_offered_ops_per_s",
            latency.rate,
            "ops/s",
            note="half the pipeline rate measured in this run",
        ),
        Metric(
            "latency_max_submit_lag_ms",
            latency.max_submit_lag_ms,
            "ms",
            note="how late the producer ran behind its schedule, at worst",
        ),
        Metric("latency_p50_ms", latency.percentile(0.50), "ms", note=where),
        Metric("latency_p95_ms", latency.percentile(0.95), "ms", note=where),
        Metric("latency_p99_ms", latency.percentile(0.99), "ms", note=where),
        none_allowed(
            "latency_not_completed",
            latency.submitted - latency.completed,
            "ops",
        ),
        retries_metric("latency_retries_scheduled", latency.retries),
    ]


def soak_metrics(soak: SoakRun) -> list[Metric]:
    fitted = soak.fitted()
    first, last = fitted[0] if fitted else soak.samples[0], soak.samples[-1]
    return [
        Metric("soak_operations", soak.operations, "ops"),
        Metric("soak_ops_per_s", soak.completed / max(soak.seconds, 1e-6), "ops/s"),
        none_allowed(
            "soak_not_completed",
            soak.operations - soak.completed,
            "ops",
        ),
        Metric(
            "soak_worker_rss_after_warm_up_mb",
            first.total / 1e6,
            "MB",
            note=f"VmRSS of the worker parent and its {last.alive} pool processes",
        ),
        Metric("soak_worker_rss_end_mb", last.total / 1e6, "MB"),
        Metric(
            "soak_worker_rss_slope",
            soak.slope_mb_per_10k(),
            "MB/10k ops",
            Target("<", 1.0),
            note=f"least squares over {len(fitted)} of {len(soak.samples)} samples (after "
            f"the first {SOAK_WARM_UP_SHARE:.0%} of the operations)",
        ),
        Metric(
            "soak_worker_parent_rss_slope",
            soak.slope_mb_per_10k(lambda s: s.parent),
            "MB/10k ops",
            note="the worker's main process alone",
        ),
        Metric(
            "soak_worker_children_rss_slope",
            soak.slope_mb_per_10k(lambda s: s.children),
            "MB/10k ops",
            note="its pool processes together",
        ),
    ]


def contention_metrics(
    distinct: tuple[PipelineRun, StockCheck], hot: tuple[PipelineRun, StockCheck]
) -> list[Metric]:
    (distinct_run, distinct_check), (hot_run, hot_check) = distinct, hot
    lowest = hot_run.lowest_stock_seen
    return [
        Metric("distinct_skus_ops_per_s", distinct_run.ops_per_s, "ops/s"),
        Metric("hot_sku_ops_per_s", hot_run.ops_per_s, "ops/s"),
        Metric(
            "hot_vs_distinct",
            _ratio(hot_run.ops_per_s, distinct_run.ops_per_s),
            "ratio",
            Target(">=", 0.90),
        ),
        none_allowed(
            "contention_not_completed",
            distinct_run.not_completed + hot_run.not_completed,
            "ops",
        ),
        none_allowed(
            "oversold_units",
            distinct_check.oversold_units + hot_check.oversold_units,
            "units",
        ),
        Metric(
            "hot_sku_lowest_level_seen",
            lowest if lowest is not None else -1,
            "units",
            Target(">=", 0),
            note="polled while the hot run went on",
        ),
        none_allowed(
            "hot_sku_final_level",
            hot_check.final_levels.get(HOT_SKU, -1),
            "units",
            note="stocked with exactly what the orders need",
        ),
        none_allowed(
            "ledger_mismatches",
            distinct_check.ledger_mismatches + hot_check.ledger_mismatches,
            "",
            note="reconciliation: level == sum of movements, ...",
        ),
        Metric(
            "deduction_rows",
            distinct_check.deductions + hot_check.deductions,
            "rows",
            Target("==", distinct_run.submitted + hot_run.submitted),
        ),
    ]


def query_metrics(timings: QueryTimings) -> list[Metric]:
    return [
        Metric("finished_operations_loaded", timings.rows, "rows"),
        Metric("bulk_load_s", timings.load_s, "s"),
        Metric(
            "stuck_sweep_ms",
            timings.sweep_ms,
            "ms",
            Target("<", 50.0),
            note="median StuckOperationSweeper.sweep() round",
        ),
        Metric(
            "metrics_query_ms",
            timings.metrics_ms,
            "ms",
            Target("<", 50.0),
            note="median collect_metrics()",
        ),
        Metric(
            "sweep_uses_status_index",
            1.0 if timings.sweep_uses_index else 0.0,
            "yes/no",
            Target("==", 1.0),
            note=SWEEP_INDEX,
        ),
        none_allowed(
            "sweep_found_stuck",
            timings.stuck_found,
            "ops",
            note="every loaded operation is finished",
        ),
    ]


# --- the whole report -------------------------------------------------------------------------


@dataclass
class Results:
    """Everything a run measured; ``metrics`` in the order they are printed, ``notes`` on how
    (printed after the table)."""

    options: dict[str, Any]
    headline: str = ""
    cpu_table: str = ""
    metrics: list[Metric] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sweep_plan: str = ""
    task_events_effective: dict[str, bool] = field(default_factory=dict)
    rss_samples: list[RssSample] = field(default_factory=list)
    profile_summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "headline": self.headline,
            "options": self.options,
            "task_events_effective": self.task_events_effective,
            "metrics": [metric.to_dict() for metric in self.metrics],
            "missed": [metric.name for metric in missed(self.metrics)],
            "notes": self.notes,
            "soak_rss_samples": [
                {"operations": s.done, "parent_bytes": s.parent, "children_bytes": s.children}
                for s in self.rss_samples
            ],
            "sweep_plan": self.sweep_plan,
        }


def report(results: Results, json_output: bool) -> None:
    """The headline first, the CPU table, the metrics, the verdict and the notes (stdout, or
    stderr with --json, whose stdout is the JSON alone)."""
    table = results_table(results.metrics)
    missing = missed(results.metrics)
    verdict = (
        "MISSED: " + ", ".join(metric.name for metric in missing) if missing else "all targets met"
    )
    stream = sys.stderr if json_output else sys.stdout
    notes = "\n".join(f"- {note}" for note in results.notes)
    parts = [results.headline, results.cpu_table, table, verdict, f"how it was measured:\n{notes}"]
    if results.profile_summary:
        parts.append(results.profile_summary)
    print("\n\n".join(part for part in parts if part), file=stream, flush=True)
    if json_output:
        print(json.dumps(results.to_dict(), indent=2))
    elif results.sweep_plan:
        print(f"\nstuck sweep query plan:\n{results.sweep_plan}")

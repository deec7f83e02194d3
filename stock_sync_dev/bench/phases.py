"""What a benchmark run measures, phase by phase, each with its worker already running:

- ratio: the bare chain (4 no-op tasks chained with canvas, sent one by one by a producer
  process) against the pipeline (orders submitted one by one with ``submit_operation`` by a
  producer process, 20 SKUs), each timed from the first submit to the last completion, with
  the CPU of every process from ``/proc``;
- batch: the same orders submitted with one ``submit_operations`` call;
- counted: SQL statements and transactions (worker and producer, counted by SQLAlchemy
  events) and HTTP requests (counted by the fake) per operation;
- latency, contention, soak: as described in ``cli``.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from stock_sync.adapters.db import Database
from stock_sync.adapters.instrumentation import (
    LabelledSqlCounter,
    SqlCounts,
    read_count_files,
)
from stock_sync.adapters.instrumentation import total as sql_total
from stock_sync.adapters.models import (
    OperationEvent,
    PendingStockOperation,
    StockLevel,
    StockMovement,
)
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.statuses import OperationStatus
from stock_sync.domain.stock import MovementReason
from stock_sync.services.reconciliation import reconcile
from stock_sync_dev.bench.harness import (
    KEY_TTL_S,
    BenchmarkError,
    FakeProcess,
    ProducerProcess,
    ProducerResult,
    Progress,
    WorkerProcess,
    producer_variables,
    reset_tables,
    say,
    stock_skus,
)
from stock_sync_dev.bench.procstat import (
    CpuUse,
    Probe,
    RssSample,
    children_of,
    cpu_use,
    least_squares_slope,
    worker_rss,
)

ACCOUNT = "bench-shop"  # the producer's (producer_main.ACCOUNT)
RATIO_SKUS = 20
HOT_SKU = "BENCH-HOT"
WARMUP = 20  # chains and orders that warm the worker up before anything is measured
POLL_S = 0.25  # the harness's polling: cheap next to the processes it measures
TERMINAL = (OperationStatus.COMPLETED, OperationStatus.FAILED, OperationStatus.CANCELLED)
SOAK_IN_FLIGHT = 40  # operations submitted and not yet finished, at most, during the soak
SOAK_SAMPLES = 100  # RSS samples over the soak
SOAK_WARM_UP_SHARE = 0.2  # the slope is fitted over the samples after this share of the soak


@dataclass(frozen=True)
class Rig:
    """What the phases share: the broker client, the run's variables, the fake, the harness's
    database and SQL counter, a scratch folder, the prefix of the run's Redis keys, the probe,
    and the profiler to attach during the ratio's pipeline run (None: no profile)."""

    client: redis.Redis
    variables: dict[str, str]
    fake: FakeProcess
    database: Database
    workdir: Path
    done_prefix: str
    probe: Probe
    own_sql: LabelledSqlCounter
    profiler: Callable[[dict[str, list[int]]], Any] | None = None

    def cpu(self, worker: WorkerProcess, producer: ProducerProcess | None) -> Any:
        others = {"producer": producer.pid if producer else None, "fake": self.fake.pid}
        try:
            return self.probe.cpu(worker.pid, others)
        except ProcessLookupError as error:
            raise BenchmarkError(str(error)) from None


def order_body(order_id: str, sku: str, quantity: int = 1) -> dict[str, Any]:
    """A READY_FOR_PROCESSING order of one line, as the fake microservice stores it."""
    return {
        "id": order_id,
        "account_name": ACCOUNT,
        "status": "READY_FOR_PROCESSING",
        "fulfillment_status": "NEW",
        "line_items": [
            {"id": f"{order_id}-1", "offer_id": f"offer-{sku}", "sku": sku, "quantity": quantity}
        ],
    }


def ratio_skus() -> list[str]:
    return [f"BENCH-S{index:02d}" for index in range(RATIO_SKUS)]


def spread_orders(prefix: str, count: int, skus: Sequence[str]) -> list[tuple[str, str]]:
    return [(f"{prefix}-{index}", skus[index % len(skus)]) for index in range(count)]


# --- the bare chain ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainRun:
    chains: int
    chains_per_s: float
    cpu: CpuUse


def bare_chain_run(rig: Rig, worker: WorkerProcess, count: int) -> ChainRun:
    """``count`` chains sent one by one by a producer process; chains per second from its
    first send to the last chain's completion (recorded in Redis by the last link)."""
    done_key = f"{rig.done_prefix}chains-{uuid.uuid4().hex[:6]}"
    for suffix in ("count", "latest"):
        rig.client.set(f"{done_key}:{suffix}", 0, ex=KEY_TTL_S)
    producer = ProducerProcess(
        ["chains", str(count), "--done-key", done_key],
        producer_variables(rig.variables, None),
        rig.workdir / "producer.log",
    )
    try:
        producer.wait_ready()
        before = rig.cpu(worker, producer)
        producer.go()
        progress = Progress("chains done", count)
        deadline = time.monotonic() + 60 + count * 0.2
        while (done := int(rig.client.get(f"{done_key}:count") or 0)) < count:
            progress.update(done)
            worker.check_alive("worker")
            producer.check_alive("producer")
            if time.monotonic() > deadline:
                raise BenchmarkError(f"only {done}/{count} bare chains finished in time")
            time.sleep(POLL_S)
        progress.finish(done)
        after = rig.cpu(worker, producer)
        sent = producer.result(60)
    finally:
        producer.close()
    finished = float(rig.client.get(f"{done_key}:latest") or 0.0)
    return ChainRun(count, count / max(finished - sent.started, 1e-6), cpu_use(before, after))


# --- the pipeline -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineRun:
    """One batch of orders: the rate counts completed operations, from the producer's first
    submit to the last operation terminal in the database; ``submit_rate`` is orders per
    second the producer submitted; ``lowest_stock_seen`` the lowest level of the watched SKU
    (None when none was)."""

    submitted: int
    completed: int
    ops_per_s: float
    producer: ProducerResult
    cpu: CpuUse
    counts: dict[str, int] = field(default_factory=dict)
    lowest_stock_seen: int | None = None

    @property
    def not_completed(self) -> int:
        return self.submitted - self.completed


def _status_counts(session: Session) -> dict[str, int]:
    op = PendingStockOperation
    rows = session.execute(select(op.status, func.count()).group_by(op.status))
    return {str(status): int(count) for status, count in rows}


def _lowest(current: int | None, seen: int | None) -> int | None:
    if seen is None:
        return current
    return seen if current is None else min(current, seen)


def wait_for_operations(
    rig: Rig,
    total: int,
    processes: Sequence[tuple[str, Any]],
    watch_sku: str | None = None,
) -> tuple[dict[str, int], int | None]:
    """Poll until ``total`` operations are terminal (checking ``processes`` stay alive); their
    counts by status, and the lowest level of ``watch_sku`` seen meanwhile."""
    terminal = {s.value for s in TERMINAL}
    progress = Progress("operations finished", total)
    deadline = time.monotonic() + 60 + total * 0.3
    lowest: int | None = None
    while True:
        with rig.own_sql.labelled("monitor"), rig.database.transaction() as session:
            counts = _status_counts(session)
            if watch_sku is not None:
                level = session.scalar(
                    select(StockLevel.quantity).where(StockLevel.sku == watch_sku)
                )
                lowest = _lowest(level, lowest)
        done = sum(count for status, count in counts.items() if status in terminal)
        progress.update(done)
        if done >= total:
            progress.finish(done)
            return counts, lowest
        for name, process in processes:
            process.check_alive(name)
        if time.monotonic() > deadline:
            raise BenchmarkError(f"operations not finished in time: {counts}")
        time.sleep(POLL_S)


def _last_terminal(rig: Rig) -> datetime | None:
    op = PendingStockOperation
    with rig.own_sql.labelled("monitor"), rig.database.transaction() as session:
        last: datetime | None = session.scalar(
            select(func.max(func.greatest(op.completed_at, op.failed_at, op.cancelled_at)))
        )
    return last


@contextmanager
def _profiled(rig: Rig, roles: dict[str, list[int]] | None) -> Iterator[None]:
    """py-spy on the processes of ``roles`` while the block runs, if the run profiles."""
    if rig.profiler is None or roles is None:
        yield
        return
    with rig.profiler(roles):
        yield


def pipeline_run(
    rig: Rig,
    worker: WorkerProcess,
    orders: Sequence[tuple[str, str]],
    mode: str = "orders",
    *,
    rate: float | None = None,
    watch_sku: str | None = None,
    count_sql_dir: Path | None = None,
    profile: bool = False,
) -> PipelineRun:
    """Submit ``orders`` ((order_id, sku), one unit each; stock them first) from a producer
    process (``mode``: orders one by one, or one batch) on empty operation tables, and wait
    until all are terminal."""
    rig.fake.add_orders([order_body(order_id, sku) for order_id, sku in orders])
    ids_file = rig.workdir / f"orders-{uuid.uuid4().hex[:6]}.txt"
    ids_file.write_text("".join(f"{order_id}\n" for order_id, _ in orders))
    arguments = [mode, str(ids_file), *(["--rate", str(rate)] if rate else [])]
    producer = ProducerProcess(
        arguments, producer_variables(rig.variables, count_sql_dir), rig.workdir / "producer.log"
    )
    try:
        producer.wait_ready()
        roles = {
            "worker-main": [worker.pid],
            "worker-pool": children_of(worker.pid),
            "producer": [producer.pid],
        }
        before = rig.cpu(worker, producer)
        with _profiled(rig, roles if profile else None):
            producer.go()
            counts, lowest = wait_for_operations(
                rig, len(orders), [("worker", worker), ("producer", producer)], watch_sku
            )
        after = rig.cpu(worker, producer)
        submitted = producer.result(60)
    finally:
        producer.close()
    completed = counts.get(OperationStatus.COMPLETED.value, 0)
    last = _last_terminal(rig)
    seconds = last.timestamp() - submitted.started if last is not None else math.inf
    return PipelineRun(
        submitted=len(orders),
        completed=completed,
        ops_per_s=completed / max(seconds, 1e-6),
        producer=submitted,
        cpu=cpu_use(before, after),
        counts=counts,
        lowest_stock_seen=lowest,
    )


def warm_up(rig: Rig, worker: WorkerProcess) -> None:
    """A few chains and orders so every pool process has imported, connected and run each
    task once; the tables are emptied after."""
    bare_chain_run(rig, worker, WARMUP)
    stock_skus(rig.database, {"BENCH-WARM": WARMUP})
    run = pipeline_run(rig, worker, spread_orders("bench-warm", WARMUP, ["BENCH-WARM"]))
    if run.not_completed:
        raise BenchmarkError(f"{run.not_completed} warm-up orders did not complete")
    reset_tables(rig.database)


@dataclass(frozen=True)
class RatioRun:
    """The headline: the bare chain and the pipeline, one by one, with the same worker."""

    bare: ChainRun
    pipeline: PipelineRun
    orders: int
    skus: int

    @property
    def ratio(self) -> float:
        return self.pipeline.ops_per_s / self.bare.chains_per_s if self.bare.chains_per_s else 0.0


def ratio_phase(rig: Rig, worker: WorkerProcess, orders: int, profile: bool) -> RatioRun:
    say(f"    warming the worker (pid {worker.pid}) up: {WARMUP} chains, {WARMUP} orders")
    warm_up(rig, worker)
    say(f"    bare chain: {orders} chains of 4 no-op tasks, sent one by one")
    bare = bare_chain_run(rig, worker, orders)
    say(f"    {bare.chains_per_s:.1f} chains/s")
    skus = ratio_skus()
    stock_skus(rig.database, dict.fromkeys(skus, 1_000_000))
    say(f"    pipeline: {orders} orders over {len(skus)} SKUs, submit_operation one by one")
    pipeline = pipeline_run(rig, worker, spread_orders("bench-p", orders, skus), profile=profile)
    say(f"    {pipeline.ops_per_s:.1f} operations/s")
    reset_tables(rig.database)
    return RatioRun(bare, pipeline, orders, len(skus))


def batch_phase(rig: Rig, worker: WorkerProcess, orders: int) -> PipelineRun:
    """The ratio's orders again, submitted with one ``submit_operations`` call."""
    skus = ratio_skus()
    stock_skus(rig.database, dict.fromkeys(skus, 1_000_000))
    run = pipeline_run(rig, worker, spread_orders("bench-b", orders, skus), "batch")
    reset_tables(rig.database)
    return run


# --- counted ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CountedRun:
    """What ``operations`` operations cost, counted: SQL of the worker and of the producer
    (statements, transactions), the harness's polling, the fake's contract requests."""

    run: PipelineRun
    worker_sql: SqlCounts
    producer_sql: SqlCounts
    monitor_sql: SqlCounts
    http: dict[str, int]
    applied_puts: int
    retries: dict[str, int]


def counted_phase(rig: Rig, worker: WorkerProcess, orders: int, worker_counts: Path) -> CountedRun:
    producer_counts = rig.workdir / f"producer-sql-{uuid.uuid4().hex[:6]}"
    skus = ratio_skus()
    stock_skus(rig.database, dict.fromkeys(skus, 1_000_000))
    worker_before = sql_total(read_count_files(worker_counts))
    monitor_before = rig.own_sql.counts().get("monitor", SqlCounts())
    http_before = rig.fake.contract_requests()
    puts_before = rig.fake.applied_puts()
    run = pipeline_run(
        rig, worker, spread_orders("bench-c", orders, skus), count_sql_dir=producer_counts
    )
    http_after = rig.fake.contract_requests()
    counted = CountedRun(
        run=run,
        worker_sql=sql_total(read_count_files(worker_counts)) - worker_before,
        producer_sql=sql_total(read_count_files(producer_counts)),
        monitor_sql=rig.own_sql.counts().get("monitor", SqlCounts()) - monitor_before,
        http={
            method: http_after.get(method, 0) - http_before.get(method, 0) for method in http_after
        },
        applied_puts=rig.fake.applied_puts() - puts_before,
        retries=retries_scheduled(rig),
    )
    reset_tables(rig.database)
    return counted


def retries_scheduled(rig: Rig) -> dict[str, int]:
    """The retries the worker scheduled so far (``retry_scheduled`` events), by error type:
    with no faults injected, each one is a stage that failed and waited its backoff."""
    event = OperationEvent
    with rig.own_sql.labelled("monitor"), rig.database.transaction() as session:
        rows = session.execute(
            select(event.error_type, func.count())
            .where(event.action == LogAction.RETRY_SCHEDULED.value)
            .group_by(event.error_type)
        ).all()
    return {str(error_type): int(count) for error_type, count in rows}


# --- latency ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyRun:
    """Submit-to-COMPLETED latencies (ms) of operations submitted open loop at ``rate``."""

    submitted: int
    completed: int
    rate: float
    max_submit_lag_ms: float
    latencies_ms: list[float]
    retries: dict[str, int]  # retries scheduled, by error type

    def percentile(self, share: float) -> float:
        """The nearest-rank percentile (``share`` in 0..1) of the completed operations."""
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return math.inf
        return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def latency_phase(rig: Rig, worker: WorkerProcess, count: int, rate: float) -> LatencyRun:
    """``count`` orders submitted by a producer process at a steady ``rate`` per second (each
    at its due time, whatever the previous ones did: an open loop), then their
    ``completed_at - created_at``."""
    skus = ratio_skus()
    stock_skus(rig.database, dict.fromkeys(skus, 1_000_000))
    run = pipeline_run(rig, worker, spread_orders("bench-l", count, skus), rate=rate)
    op = PendingStockOperation
    with rig.own_sql.labelled("monitor"), rig.database.transaction() as session:
        rows = session.execute(
            select(op.created_at, op.completed_at).where(
                op.status == OperationStatus.COMPLETED.value
            )
        ).all()
    retries = retries_scheduled(rig)
    reset_tables(rig.database)
    latencies = [
        (done - created).total_seconds() * 1000 for created, done in rows if done is not None
    ]
    return LatencyRun(
        submitted=count,
        completed=run.completed,
        rate=rate,
        max_submit_lag_ms=run.producer.max_lag_s * 1000,
        latencies_ms=latencies,
        retries=retries,
    )


# --- contention -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StockCheck:
    """Oversold units (deducted beyond the initial stock, or a level below zero), ledger
    mismatches (reconciliation findings) and deduction rows written."""

    oversold_units: int
    ledger_mismatches: int
    deductions: int
    final_levels: dict[str, int] = field(default_factory=dict)


def check_stock(database: Database, initial: dict[str, int]) -> StockCheck:
    """Compare what was deducted with what was stocked, and reconcile the whole ledger."""
    with database.transaction() as session:
        rows = session.execute(
            select(StockMovement.sku, -func.sum(StockMovement.delta))
            .where(StockMovement.reason == MovementReason.DEDUCTION.value)
            .group_by(StockMovement.sku)
        )
        deducted = {sku: int(units) for sku, units in rows}
        deductions = int(
            session.scalar(
                select(func.count()).where(StockMovement.reason == MovementReason.DEDUCTION.value)
            )
            or 0
        )
        levels = {
            sku: int(quantity)
            for sku, quantity in session.execute(select(StockLevel.sku, StockLevel.quantity))
        }
        report = reconcile(session)
    oversold = sum(max(0, deducted.get(sku, 0) - stock) for sku, stock in initial.items())
    oversold += sum(-level for level in levels.values() if level < 0)
    return StockCheck(oversold, len(report.mismatches), deductions, levels)


def distinct_skus_run(
    rig: Rig, worker: WorkerProcess, count: int
) -> tuple[PipelineRun, StockCheck]:
    """``count`` orders of one unit, each on its own SKU stocked with exactly 1."""
    initial = {f"BENCH-D{index:05d}": 1 for index in range(count)}
    stock_skus(rig.database, initial)
    orders = [(f"bench-d-{i}", sku) for i, sku in enumerate(sorted(initial))]
    run = pipeline_run(rig, worker, orders)
    check = check_stock(rig.database, initial)
    reset_tables(rig.database)
    return run, check


def hot_sku_run(rig: Rig, worker: WorkerProcess, count: int) -> tuple[PipelineRun, StockCheck]:
    """``count`` orders of one unit on one SKU stocked with exactly ``count``."""
    initial = {HOT_SKU: count}
    stock_skus(rig.database, initial)
    orders = [(f"bench-h-{i}", HOT_SKU) for i in range(count)]
    run = pipeline_run(rig, worker, orders, watch_sku=HOT_SKU)
    check = check_stock(rig.database, initial)
    reset_tables(rig.database)
    return run, check


# --- soak -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakRun:
    """The worker's RSS (bytes) sampled against operations finished, and the fitted slope."""

    operations: int
    completed: int
    seconds: float
    samples: list[RssSample]

    def fitted(self) -> list[RssSample]:
        """The samples the slope is fitted over: after the warm-up share of the soak."""
        return [s for s in self.samples if s.done >= SOAK_WARM_UP_SHARE * self.operations]

    def slope_mb_per_10k(self, part: Callable[[RssSample], int] = lambda s: s.total) -> float:
        """Least-squares slope of RSS (all of it, or ``part``) over operations, in MB
        (10^6 bytes) per 10,000 operations."""
        points = [(s.done, part(s)) for s in self.fitted()]
        return least_squares_slope(points) * 10_000 / 1e6


_NOT_FINISHED = [s.value for s in OperationStatus if s not in TERMINAL]


def _unfinished(rig: Rig) -> int:
    """Operations not terminal yet (a handful: an index scan of the status index)."""
    op = PendingStockOperation
    with rig.own_sql.labelled("monitor"), rig.database.transaction() as session:
        return int(session.scalar(select(func.count()).where(op.status.in_(_NOT_FINISHED))) or 0)


def soak_phase(rig: Rig, worker: WorkerProcess, count: int) -> SoakRun:
    """``count`` orders kept flowing (at most ``SOAK_IN_FLIGHT`` unfinished at a time,
    submitted from this process) while the worker's RSS is sampled about ``SOAK_SAMPLES``
    times."""
    from stock_sync.producer import submit_operation

    skus = ratio_skus()
    stock_skus(rig.database, dict.fromkeys(skus, 1_000_000))
    every = max(1, count // SOAK_SAMPLES)
    samples = [worker_rss(worker.pid, 0)]
    progress = Progress("operations finished", count)
    deadline = time.monotonic() + 120 + count * 0.3
    started = time.monotonic()
    submitted = done = 0
    while done < count:
        batch: list[tuple[str, str]] = []
        while submitted + len(batch) < count and submitted - done + len(batch) < SOAK_IN_FLIGHT:
            batch.append((f"bench-s-{submitted + len(batch)}", skus[submitted % len(skus)]))
        if batch:
            rig.fake.add_orders([order_body(order_id, sku) for order_id, sku in batch])
            for order_id, _ in batch:
                submit_operation(order_id, ACCOUNT)
            submitted += len(batch)
        time.sleep(0.05)
        done = submitted - _unfinished(rig)
        progress.update(done)
        if done >= samples[-1].done + every or done >= count:
            samples.append(worker_rss(worker.pid, done))
        worker.check_alive("worker")
        if time.monotonic() > deadline:
            raise BenchmarkError(f"the soak finished only {done}/{count} operations in time")
    seconds = time.monotonic() - started
    progress.finish(done)
    with rig.own_sql.labelled("monitor"), rig.database.transaction() as session:
        completed = _status_counts(session).get(OperationStatus.COMPLETED.value, 0)
    reset_tables(rig.database)
    return SoakRun(count, completed, seconds, samples)

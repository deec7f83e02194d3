"""``python -m stock_sync.benchmark`` (``make benchmark``): the design's performance targets,
measured in one run.

Phases, all against one real worker subprocess (``python -m celery -A tasks worker --pool
prefork --concurrency 2 --without-heartbeat --without-mingle --without-gossip``; prefork beat
the threads pool for both the baseline and the pipeline on a 2-core machine) on the same Redis
broker and the same Celery settings (``celeryconfig.build``):

1. baseline: chains of 4 no-op tasks registered below; the last link records its completion in
   Redis (one Lua call: INCR a counter, keep the latest completion time). chains/s.
2. pipeline: one-line orders over 100 well-stocked SKUs through the real pipeline with
   PostgreSQL and the fake microservice (served from this process, no faults), submitted with
   ``submit_operation``; operations/s and its ratio to the baseline (target >= 60%).
3. contention: the same number of orders on one hot SKU and on as many distinct SKUs, each
   stocked with exactly what the orders need; the ratio of the rates (target >= 90%), oversold
   units and ledger mismatches (target 0).
4. queries: 1,000,000 finished operations (spread over 30 days, so the metrics' one-hour
   window holds ~1,400 of them) bulk-inserted with ``generate_series``, then VACUUM ANALYZE; the
   median time of a stuck sweep round and of ``collect_metrics`` (target < 50 ms each) and
   whether the sweep's query plan uses the (status, updated_at) index.

Rates are counted from the first enqueue to the last completion (the worker's own timestamp:
``completed_at`` in the database, or the time recorded by the last no-op). Everything runs in a
throwaway database and a queue of its own; the worker, the fake, the database and the queue
are removed on exit, Ctrl-C and SIGTERM included. Inherited ``STOCK_SYNC_*`` variables are
ignored: the run measures the default settings plus its own database, broker, queue and
microservice URL. A missed target is printed as MISSED and still exits 0 (a measurement, not a
test); an error exits 1, Ctrl-C 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import redis
from celery import chain
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session

from stock_sync import schema
from stock_sync.composition import build_services, reset_services
from stock_sync.db import Database, normalise_database_url, reset_databases
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.statuses import OperationStatus
from stock_sync.domain.stock import MovementReason
from stock_sync.fake_microservice import FakeMicroservice
from stock_sync.metrics import collect_metrics
from stock_sync.models import PendingStockOperation, StockLevel, StockMovement, utcnow
from stock_sync.producer import submit_operation
from stock_sync.reconciliation import reconcile
from stock_sync.settings import ENV_PREFIX, Settings, get_settings
from stock_sync.stock_ledger import set_stock
from stock_sync.stuck import is_stuck
from stock_sync.sweeps import StuckOperationSweeper
from tasks.app import app

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_ADMIN_URL = "postgresql+psycopg2://postgres@localhost:5432/postgres"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_ORDERS = 1000
DEFAULT_ROWS = 1_000_000
QUICK_ORDERS = 100
QUICK_ROWS = 10_000
DEFAULT_POOL = "prefork"
DEFAULT_CONCURRENCY = 2
DEFAULT_QUERY_RUNS = 9
WARMUP_CHAINS = 20
WARMUP_ORDERS = 20
PIPELINE_SKUS = 100
HOT_SKU = "BENCH-HOT"
TERMINAL = (OperationStatus.COMPLETED, OperationStatus.FAILED, OperationStatus.CANCELLED)
ACCOUNT = "bench-shop"
ROWS_SPREAD_S = 30 * 86_400  # the finished operations are spread over the last 30 days
SWEEP_INDEX = "ix_pending_stock_operations_status_updated_at"
TABLES = ("operation_events", "stock_movements", "stock_levels", "pending_stock_operations")
KEY_TTL_S = 3600

NOOP = "stock_sync.benchmark.noop"
NOOP_DONE = "stock_sync.benchmark.noop_done"

# KEYS: counter, latest completion time; ARGV: this completion's time (epoch seconds).
_RECORD_DONE_LUA = """
local done = redis.call('INCR', KEYS[1])
local latest = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) > latest then redis.call('SET', KEYS[2], ARGV[1], 'KEEPTTL') end
return done
"""


class BenchmarkError(Exception):
    """A phase could not be measured (worker died, timeout, ...): the run exits 1."""


# --- the no-op tasks of the baseline (registered on the worker with --include) ------------

_redis_clients: dict[int, redis.Redis] = {}


def _worker_redis() -> redis.Redis:
    """This process's Redis client on the configured broker (one per forked child)."""
    client = _redis_clients.get(os.getpid())
    if client is None:
        client = _redis_clients[os.getpid()] = redis.Redis.from_url(
            get_settings().effective_broker_url
        )
    return client


def _noop(value: str) -> str:
    """A link of the baseline chain: passes its argument on, like a pipeline stage."""
    return value


def _noop_done(value: str, done_key: str) -> str:
    """The last link: counts the chain as done under ``done_key`` with its completion time."""
    _worker_redis().eval(
        _RECORD_DONE_LUA, 2, f"{done_key}:count", f"{done_key}:latest", repr(time.time())
    )
    return value


# Registered without decorator syntax so the bodies above stay typed.
noop = app.task(name=NOOP)(_noop)
noop_done = app.task(name=NOOP_DONE)(_noop_done)


# --- results ------------------------------------------------------------------------------


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


def _format(value: float, unit: str) -> str:
    if unit == "ratio":
        return f"{value * 100:.1f}%"
    if unit in ("ms", "s"):
        return f"{value:.2f} {unit}"
    if unit in ("chains/s", "ops/s"):
        return f"{value:.1f} {unit}"
    if unit == "yes/no":
        return "yes" if value else "no"
    shown = f"{int(value):,}" if float(value).is_integer() else f"{value:g}"
    return shown + (f" {unit}" if unit else "")


def _format_target(metric: Metric) -> str:
    target = metric.target
    if target is None:
        return "-"
    return f"{target.op} {_format(target.bound, metric.unit)}"


def results_table(metrics: Sequence[Metric]) -> str:
    """The results as an aligned text table: name, value, target, result (ok/MISSED/info)."""
    rows = [("metric", "value", "target", "result")]
    for metric in metrics:
        verdict = {None: "info", True: "ok", False: "MISSED"}[metric.passed]
        rows.append(
            (metric.name, _format(metric.value, metric.unit), _format_target(metric), verdict)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def missed(metrics: Sequence[Metric]) -> list[Metric]:
    return [metric for metric in metrics if metric.passed is False]


# --- progress ----------------------------------------------------------------------------


def say(message: str) -> None:
    """A progress line on stderr (stdout is kept for the results)."""
    print(message, file=sys.stderr, flush=True)


class Progress:
    """A ``done/total`` counter on stderr: redrawn in place on a terminal, every 25% otherwise."""

    def __init__(self, label: str, total: int) -> None:
        self._label = label
        self._total = max(total, 1)
        self._tty = sys.stderr.isatty()
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._last_quarter = 0

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self._tty:
            if now - self._last_draw >= 0.2:
                self._last_draw = now
                sys.stderr.write(f"\r    {self._label}: {done}/{self._total}")
                sys.stderr.flush()
            return
        quarter = min(4, 4 * done // self._total)
        if quarter > self._last_quarter:
            self._last_quarter = quarter
            say(f"    {self._label}: {done}/{self._total}")

    def finish(self, done: int) -> None:
        elapsed = time.monotonic() - self._started
        if self._tty:
            sys.stderr.write("\r")
        say(f"    {self._label}: {done}/{self._total} in {elapsed:.1f} s")


# --- resources: database, worker, queue ----------------------------------------------------


def _admin_execute(admin_url: str, statement: str) -> None:
    engine = create_engine(normalise_database_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(statement))
    finally:
        engine.dispose()


@contextlib.contextmanager
def throwaway_database(
    admin_url: str, *, prefix: str = "stock_sync_bench", create_options: str = ""
) -> Iterator[str]:
    """A new, migrated PostgreSQL database's URL; dropped (connections forced out) on exit.

    ``create_options`` is appended to CREATE DATABASE (a template, a locale, ...)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _admin_execute(admin_url, f'CREATE DATABASE "{name}" {create_options}'.rstrip())
    try:
        url = normalise_database_url(admin_url.rsplit("/", 1)[0] + f"/{name}")
        schema.upgrade(url)
        yield url
    finally:
        reset_databases()
        _admin_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def worker_environment(
    database_url: str, broker_url: str, microservice_url: str, queue: str, data_dir: Path
) -> dict[str, str]:
    """The STOCK_SYNC_* variables of the run (the worker's and this process's)."""
    return {
        f"{ENV_PREFIX}DATABASE_URL": database_url,
        f"{ENV_PREFIX}BROKER_URL": broker_url,
        f"{ENV_PREFIX}MICROSERVICE_URL": microservice_url,
        f"{ENV_PREFIX}QUEUE_NAME": queue,
        f"{ENV_PREFIX}LOG_LEVEL": "WARNING",
        f"{ENV_PREFIX}DATA_DIR": str(data_dir),
    }


def without_stock_sync_variables(environment: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in environment.items() if not name.startswith(ENV_PREFIX)}


def configure_this_process(variables: dict[str, str]) -> Settings:
    """Make this process (producer, sweeps, metrics) use exactly ``variables``."""
    import celeryconfig  # imported late: it reads the settings when imported

    for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
        del os.environ[name]
    os.environ.update(variables)
    get_settings.cache_clear()
    reset_services()
    reset_databases()
    settings = get_settings()
    app.conf.update(celeryconfig.build(settings))
    return settings


class CeleryProcess:
    """``python -m celery -A tasks <arguments>`` in its own process group, output in a file."""

    def __init__(self, arguments: Sequence[str], variables: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        command = [sys.executable, "-m", "celery", "-A", "tasks", *arguments]
        environment = {**without_stock_sync_variables(dict(os.environ)), **variables}
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPOSITORY,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_code(self) -> int | None:
        """The exit code once the process has ended, None while it runs."""
        return self.process.poll()

    def log_tail(self, characters: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]

    def kill(self) -> None:
        """SIGKILL the whole process group (a prefork worker's children too), then reap."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        """Warm shutdown of the process group; killed if it takes over 30 s."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()


def worker_arguments(pool: str, concurrency: int, hostname: str) -> list[str]:
    """``celery worker`` arguments of the dev tools: no mingle, gossip or heartbeat (nothing
    to sync with, and they cost a second at start)."""
    return [
        "worker", "--pool", pool, "--concurrency", str(concurrency),
        "--loglevel", "WARNING", "--hostname", hostname,
        "--without-heartbeat", "--without-mingle", "--without-gossip",
    ]  # fmt: skip


class WorkerProcess(CeleryProcess):
    """The benchmark's worker, with its no-op tasks registered (``--include``)."""

    def __init__(
        self, variables: dict[str, str], log_path: Path, pool: str, concurrency: int
    ) -> None:
        hostname = f"bench-{uuid.uuid4().hex[:8]}@%h"
        arguments = worker_arguments(pool, concurrency, hostname)
        super().__init__([*arguments, "--include", "stock_sync.benchmark"], variables, log_path)

    def check_alive(self) -> None:
        """Raise BenchmarkError (with the end of its log) if the worker has exited."""
        code = self.exit_code()
        if code is not None:
            raise BenchmarkError(f"the worker exited with {code}:\n{self.log_tail()}")


@contextlib.contextmanager
def running_worker(
    variables: dict[str, str], log_path: Path, pool: str, concurrency: int
) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(variables, log_path, pool, concurrency)
    try:
        yield worker
    finally:
        worker.stop()


def forget_redis_keys(client: redis.Redis, queue: str, done_prefix: str) -> None:
    """Delete the run's queue, its binding and the completion counters."""
    keys = [queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
    keys += [key.decode() for key in client.scan_iter(match=f"{done_prefix}*")]
    client.delete(*keys)


# --- phase 1: the baseline ------------------------------------------------------------------


def _wait_for_chains(
    client: redis.Redis, done_key: str, total: int, worker: WorkerProcess, timeout_s: float
) -> float:
    """Wait until ``total`` chains recorded completion; the latest completion time (epoch)."""
    progress = Progress("chains done", total)
    deadline = time.monotonic() + timeout_s
    while True:
        done = int(client.get(f"{done_key}:count") or 0)
        progress.update(done)
        if done >= total:
            progress.finish(done)
            return float(client.get(f"{done_key}:latest") or 0.0)
        worker.check_alive()
        if time.monotonic() > deadline:
            raise BenchmarkError(f"only {done}/{total} no-op chains finished in {timeout_s:.0f} s")
        time.sleep(0.02)


def _enqueue_chains(done_key: str, count: int) -> None:
    for index in range(count):
        chain(noop.s(str(index)), noop.s(), noop.s(), noop_done.s(done_key)).apply_async()


def run_chains(client: redis.Redis, done_key: str, count: int, worker: WorkerProcess) -> float:
    """Enqueue ``count`` 4-link no-op chains and wait for them; chains per second."""
    for suffix in ("count", "latest"):
        client.set(f"{done_key}:{suffix}", 0, ex=KEY_TTL_S)
    started = time.time()
    _enqueue_chains(done_key, count)
    say(f"    enqueued {count} chains in {time.time() - started:.1f} s")
    finished = _wait_for_chains(client, done_key, count, worker, timeout_s=60 + count * 0.2)
    return count / max(finished - started, 1e-6)


def baseline_phase(
    client: redis.Redis, done_prefix: str, count: int, worker: WorkerProcess
) -> float:
    """Warm the worker up (also proves it consumes), then measure; chains per second."""
    say(f"    waiting for the worker (pid {worker.pid}) with {WARMUP_CHAINS} warm-up chains")
    run_chains(client, f"{done_prefix}warmup", WARMUP_CHAINS, worker)
    return run_chains(client, f"{done_prefix}baseline", count, worker)


# --- phases 2 and 3: the pipeline --------------------------------------------------------


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


@dataclass(frozen=True)
class PipelineRun:
    """What one batch of orders did: the rate counts completed operations only;
    ``lowest_stock_seen`` is the lowest level of the watched SKU (None when none was)."""

    submitted: int
    completed: int
    not_completed: int
    ops_per_s: float
    lowest_stock_seen: int | None = None


@dataclass(frozen=True)
class StockCheck:
    """Oversold units (deducted beyond the initial stock, or a level below zero), ledger
    mismatches (reconciliation findings) and deduction rows written."""

    oversold_units: int
    ledger_mismatches: int
    deductions: int
    final_levels: dict[str, int] = field(default_factory=dict)


def reset_tables(database: Database) -> None:
    with database.transaction() as session:
        session.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))


def stock_skus(database: Database, levels: dict[str, int]) -> None:
    with database.transaction() as session:
        for sku, quantity in sorted(levels.items()):
            set_stock(session, sku, quantity)


def _status_counts(session: Session) -> dict[str, int]:
    op = PendingStockOperation
    rows = session.execute(select(op.status, func.count()).group_by(op.status))
    return {str(status): int(count) for status, count in rows}


def _lowest(current: int | None, seen: int | None) -> int | None:
    if seen is None:
        return current
    return seen if current is None else min(current, seen)


def wait_for_operations(
    database: Database, total: int, worker: WorkerProcess, watch_sku: str | None = None
) -> tuple[dict[str, int], int | None]:
    """Poll until ``total`` operations are terminal; their counts by status, and the lowest
    level of ``watch_sku`` seen meanwhile (None when not watched)."""
    terminal = {s.value for s in TERMINAL}
    progress = Progress("operations finished", total)
    timeout_s = 60 + total * 0.3
    deadline = time.monotonic() + timeout_s
    lowest: int | None = None
    while True:
        with database.transaction() as session:
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
        worker.check_alive()
        if time.monotonic() > deadline:
            raise BenchmarkError(f"operations not finished after {timeout_s:.0f} s: {counts}")
        time.sleep(0.1)


def _last_completion(database: Database) -> datetime | None:
    with database.transaction() as session:
        return session.scalar(select(func.max(PendingStockOperation.completed_at)))


def run_orders(
    database: Database,
    fake: FakeMicroservice,
    orders: Sequence[tuple[str, str]],
    worker: WorkerProcess,
    watch_sku: str | None = None,
) -> PipelineRun:
    """Submit ``orders`` ((order_id, sku), one unit each; stock them first) on empty operation
    tables and wait until all are terminal; the rate counts completed operations from the
    first submit to the last ``completed_at``."""
    for order_id, sku in orders:
        fake.add_order(order_body(order_id, sku))
    started = utcnow()
    progress = Progress("submitted", len(orders))
    for index, (order_id, _) in enumerate(orders, start=1):
        submit_operation(order_id, ACCOUNT)
        progress.update(index)
    progress.finish(len(orders))
    counts, lowest = wait_for_operations(database, len(orders), worker, watch_sku)
    completed = counts.get(OperationStatus.COMPLETED.value, 0)
    last = _last_completion(database)
    seconds = (last - started).total_seconds() if last is not None else math.inf
    return PipelineRun(
        submitted=len(orders),
        completed=completed,
        not_completed=len(orders) - completed,
        ops_per_s=completed / max(seconds, 1e-6),
        lowest_stock_seen=lowest,
    )


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


def warm_up_pipeline(database: Database, fake: FakeMicroservice, worker: WorkerProcess) -> None:
    """A few orders so every worker child has its connections; the tables are emptied after."""
    stock_skus(database, {"BENCH-WARM": WARMUP_ORDERS})
    orders = [(f"bench-warm-{i}", "BENCH-WARM") for i in range(WARMUP_ORDERS)]
    run = run_orders(database, fake, orders, worker)
    if run.not_completed:
        raise BenchmarkError(f"{run.not_completed} warm-up orders did not complete")
    reset_tables(database)


def pipeline_phase(
    database: Database, fake: FakeMicroservice, count: int, worker: WorkerProcess
) -> PipelineRun:
    """``count`` one-line orders over a pool of SKUs stocked far above demand."""
    skus = [f"BENCH-P{index:03d}" for index in range(PIPELINE_SKUS)]
    stock_skus(database, dict.fromkeys(skus, 1_000_000))
    orders = [(f"bench-p-{i}", skus[i % PIPELINE_SKUS]) for i in range(count)]
    run = run_orders(database, fake, orders, worker)
    reset_tables(database)
    return run


def distinct_skus_run(
    database: Database, fake: FakeMicroservice, count: int, worker: WorkerProcess
) -> tuple[PipelineRun, StockCheck]:
    """``count`` orders of one unit, each on its own SKU stocked with exactly 1."""
    initial = {f"BENCH-D{index:05d}": 1 for index in range(count)}
    stock_skus(database, initial)
    orders = [(f"bench-d-{i}", sku) for i, sku in enumerate(sorted(initial))]
    run = run_orders(database, fake, orders, worker)
    check = check_stock(database, initial)
    reset_tables(database)
    return run, check


def hot_sku_run(
    database: Database, fake: FakeMicroservice, count: int, worker: WorkerProcess
) -> tuple[PipelineRun, StockCheck]:
    """``count`` orders of one unit on one SKU stocked with exactly ``count``."""
    initial = {HOT_SKU: count}
    stock_skus(database, initial)
    orders = [(f"bench-h-{i}", HOT_SKU) for i in range(count)]
    run = run_orders(database, fake, orders, worker, watch_sku=HOT_SKU)
    check = check_stock(database, initial)
    reset_tables(database)
    return run, check


# --- phase 4: the queries on a big table ------------------------------------------------------

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
    with database.engine.connect() as connection:
        autocommit = connection.execution_options(isolation_level="AUTOCOMMIT")
        autocommit.execute(text("VACUUM ANALYZE pending_stock_operations"))
        autocommit.execute(text("VACUUM ANALYZE operation_events"))


class _NoDispatch:
    """A dispatcher that enqueues nothing: the timed sweep must not put work on a broker."""

    def enqueue_pipeline(self, operation_id: uuid.UUID, status: OperationStatus) -> None:
        return None

    def enqueue_rollback(self, adjustment_operation_id: uuid.UUID) -> None:
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
    """EXPLAIN ANALYZE of the sweep's claim query (the statement of
    ``StuckOperationSweeper._claim_batch``, built from the same ``is_stuck`` predicate)."""
    op = PendingStockOperation
    statement = (
        select(op.id)
        .where(is_stuck(utcnow(), settings.stuck_after_s))
        .order_by(op.updated_at)
        .limit(settings.sweep_batch_size)
        .with_for_update(skip_locked=True)
    )
    with database.engine.connect() as connection:
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


# --- the run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    orders: int
    rows: int
    pool: str
    concurrency: int
    query_runs: int
    admin_url: str
    redis_url: str
    json_output: bool


@dataclass
class Results:
    """Everything a run measured; ``metrics`` in the order they are printed."""

    options: Options
    metrics: list[Metric] = field(default_factory=list)
    sweep_plan: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": {
                "orders": self.options.orders,
                "rows": self.options.rows,
                "pool": self.options.pool,
                "concurrency": self.options.concurrency,
                "query_runs": self.options.query_runs,
            },
            "metrics": [metric.to_dict() for metric in self.metrics],
            "missed": [metric.name for metric in missed(self.metrics)],
            "sweep_plan": self.sweep_plan,
        }


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def pipeline_metrics(baseline: float, pipeline: PipelineRun) -> list[Metric]:
    return [
        Metric("baseline_chains_per_s", baseline, "chains/s", note="4 no-op tasks per chain"),
        Metric("pipeline_ops_per_s", pipeline.ops_per_s, "ops/s"),
        Metric(
            "pipeline_vs_baseline",
            _ratio(pipeline.ops_per_s, baseline),
            "ratio",
            Target(">=", 0.60),
        ),
        Metric("pipeline_not_completed", pipeline.not_completed, "ops", Target("==", 0)),
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
        Metric(
            "contention_not_completed",
            distinct_run.not_completed + hot_run.not_completed,
            "ops",
            Target("==", 0),
        ),
        Metric(
            "oversold_units",
            distinct_check.oversold_units + hot_check.oversold_units,
            "units",
            Target("==", 0),
        ),
        Metric(
            "hot_sku_lowest_level_seen",
            lowest if lowest is not None else -1,
            "units",
            Target(">=", 0),
            note="polled while the hot run went on",
        ),
        Metric(
            "hot_sku_final_level",
            hot_check.final_levels.get(HOT_SKU, -1),
            "units",
            Target("==", 0),
            note="stocked with exactly what the orders need",
        ),
        Metric(
            "ledger_mismatches",
            distinct_check.ledger_mismatches + hot_check.ledger_mismatches,
            "",
            Target("==", 0),
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
        Metric(
            "sweep_found_stuck",
            timings.stuck_found,
            "ops",
            Target("==", 0),
            note="every loaded operation is finished",
        ),
    ]


@dataclass(frozen=True)
class Rig:
    """What the throughput phases share: the broker client, the worker's variables, the fake,
    the database, a scratch folder and the prefix of the run's Redis keys."""

    client: redis.Redis
    variables: dict[str, str]
    fake: FakeMicroservice
    database: Database
    workdir: Path
    done_prefix: str


def measure_throughput(options: Options, rig: Rig) -> list[Metric]:
    """Phases 1 to 3 with one worker, stopped before returning."""
    log_path = rig.workdir / "worker.log"
    database, fake = rig.database, rig.fake
    with running_worker(rig.variables, log_path, options.pool, options.concurrency) as worker:
        say(
            f"[1/4] baseline: {options.orders} chains of 4 no-op tasks "
            f"({options.pool} pool, concurrency {options.concurrency})"
        )
        baseline = baseline_phase(rig.client, rig.done_prefix, options.orders, worker)
        say(f"    {baseline:.1f} chains/s")
        say(f"[2/4] pipeline: {options.orders} orders with PostgreSQL and the fake microservice")
        warm_up_pipeline(database, fake, worker)
        pipeline = pipeline_phase(database, fake, options.orders, worker)
        say(f"    {pipeline.ops_per_s:.1f} operations/s")
        say(f"[3/4] contention: {options.orders} orders on distinct SKUs, then on one hot SKU")
        distinct = distinct_skus_run(database, fake, options.orders, worker)
        say(f"    distinct SKUs: {distinct[0].ops_per_s:.1f} operations/s")
        hot = hot_sku_run(database, fake, options.orders, worker)
        say(f"    hot SKU: {hot[0].ops_per_s:.1f} operations/s")
    return pipeline_metrics(baseline, pipeline) + contention_metrics(distinct, hot)


def run(options: Options) -> Results:
    """Every phase, with everything it starts stopped and removed before returning or raising."""
    results = Results(options)
    run_id = uuid.uuid4().hex[:8]
    queue = f"stock-sync-bench-{run_id}"
    done_prefix = f"stock-sync-bench:{run_id}:"
    client = redis.Redis.from_url(options.redis_url)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stock-sync-bench-")))
        say("preparing: throwaway database, fake microservice, worker")
        database_url = stack.enter_context(throwaway_database(options.admin_url))
        stack.callback(forget_redis_keys, client, queue, done_prefix)
        fake = stack.enter_context(FakeMicroservice())
        variables = worker_environment(database_url, options.redis_url, fake.url, queue, workdir)
        settings = configure_this_process(variables)
        database = Database(database_url)
        stack.callback(database.dispose)
        rig = Rig(client, variables, fake, database, workdir, done_prefix)
        results.metrics += measure_throughput(options, rig)
        fake.stop()
        say(f"[4/4] queries: {options.rows:,} finished operations")
        timings = query_phase(database, settings, options.rows, options.query_runs)
        results.metrics += query_metrics(timings)
        results.sweep_plan = timings.sweep_plan
    return results


# --- command line -------------------------------------------------------------------------


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m stock_sync.benchmark",
        description="Measure stock-sync's performance targets (DESIGN.md) in one run.",
    )
    parser.add_argument(
        "--orders",
        type=_positive,
        default=None,
        help=f"chains / orders per throughput phase (default {DEFAULT_ORDERS})",
    )
    parser.add_argument(
        "--rows",
        type=_positive,
        default=None,
        help=f"finished operations for the query phase (default {DEFAULT_ROWS:,})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_ORDERS} orders and {QUICK_ROWS:,} rows (a smoke run)",
    )
    parser.add_argument("--pool", choices=("prefork", "threads"), default=DEFAULT_POOL)
    parser.add_argument("--concurrency", type=_positive, default=DEFAULT_CONCURRENCY)
    parser.add_argument(
        "--runs",
        type=_positive,
        default=DEFAULT_QUERY_RUNS,
        help="timed runs per query (the median is reported)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("STOCK_SYNC_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL),
        help="an admin connection allowed to CREATE/DROP DATABASE",
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("STOCK_SYNC_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the results as JSON on stdout (the table goes to stderr)",
    )
    args = parser.parse_args(argv)
    return Options(
        orders=args.orders or (QUICK_ORDERS if args.quick else DEFAULT_ORDERS),
        rows=args.rows or (QUICK_ROWS if args.quick else DEFAULT_ROWS),
        pool=args.pool,
        concurrency=args.concurrency,
        query_runs=args.runs,
        admin_url=args.postgres_url,
        redis_url=args.redis_url,
        json_output=args.json,
    )


def report(results: Results) -> None:
    """The table (stdout, or stderr with --json), the JSON, and a clear MISSED summary."""
    table = results_table(results.metrics)
    missing = missed(results.metrics)
    verdict = (
        "MISSED: " + ", ".join(metric.name for metric in missing) if missing else "all targets met"
    )
    stream = sys.stderr if results.options.json_output else sys.stdout
    print(f"\n{table}\n\n{verdict}", file=stream, flush=True)
    if results.options.json_output:
        print(json.dumps(results.to_dict(), indent=2))
    else:
        print(f"\nstuck sweep query plan:\n{results.sweep_plan}")


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """0 when measured (targets missed or not), 1 on an error, 130 when interrupted."""
    options = parse_options(argv)
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        results = run(options)
    except KeyboardInterrupt:
        say("interrupted; everything the benchmark started was stopped")
        return 130
    except BenchmarkError as error:
        say(f"benchmark failed: {error}")
        return 1
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

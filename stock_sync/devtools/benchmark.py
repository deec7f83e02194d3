"""``python -m stock_sync.devtools.benchmark`` (``make benchmark``): the design's performance
targets, measured in one run, with what each operation costs.

Phases, all against one real worker subprocess (``python -m celery -A tasks worker --pool
prefork --concurrency 2 --without-heartbeat --without-mingle --without-gossip``; prefork beat
the threads pool for both the baseline and the pipeline on a 2-core machine) on the same Redis
broker and the same Celery settings (``celeryconfig.build``; task events set explicitly on both
sides with ``STOCK_SYNC_TASK_EVENTS``, ``--task-events on|off``, default off):

1. baseline: chains of 4 no-op tasks registered below; the last link records its completion in
   Redis (one Lua call: INCR a counter, keep the latest completion time). chains/s, and CPU
   milliseconds per chain by process.
2. pipeline: one-line orders over 100 well-stocked SKUs through the real pipeline with
   PostgreSQL and the fake microservice (served from this process, no faults), submitted with
   ``submit_operation``; operations/s and its ratio to the baseline (target >= 60%); CPU
   milliseconds per operation by process; SQL statements, transactions and HTTP requests per
   operation, counted (see "Measuring" below).
3. latency: operations submitted open loop at half the rate phase 2 measured; the p50, p95 and
   p99 of ``completed_at - created_at`` (submit to COMPLETED, as the database recorded them).
4. contention: the same number of orders on one hot SKU and on as many distinct SKUs, each
   stocked with exactly what the orders need; the ratio of the rates (target >= 90%), oversold
   units and ledger mismatches (target 0).
5. soak (``--soak N``; ``make soak`` runs 20,000 on its own with ``--soak-only``): N operations
   kept flowing (a bounded number in flight), the worker's RSS (parent and pool children,
   VmRSS) sampled ~100 times; the least-squares slope after the first 20% of the operations, in
   MB (10^6 bytes) per 10,000 operations (target < 1).
6. queries: 1,000,000 finished operations (spread over 30 days, so the metrics' one-hour
   window holds ~1,400 of them) bulk-inserted with ``generate_series``, then VACUUM ANALYZE; the
   median time of a stuck sweep round and of ``collect_metrics`` (target < 50 ms each) and
   whether the sweep's query plan uses the (status, updated_at) index.

Rates are counted from the first enqueue to the last completion (the worker's own timestamp:
``completed_at`` in the database, or the time recorded by the last no-op).

Measuring (phases 1 and 2):

- CPU: utime + stime from ``/proc/<pid>/stat`` before and after the phase. Worker children: the
  pool processes alive (``/proc/<pid>/task/*/children``) plus the ones already reaped (the
  parent's cutime + cstime). PostgreSQL: the backends of the benchmark database, found in
  ``pg_stat_activity`` and told apart by ``application_name`` (the worker's, this process's,
  other ones such as autovacuum); a backend that exits during the phase is lost (counted and
  reported); a backend born during it counts whole. The server's other databases are left out
  because other work may use the same server; the whole server (every process of the
  postmaster, exited ones included) is reported on its own row, meaningful only on an otherwise
  idle server. Redis: the ``redis-server`` process (its pid from INFO), shared with whatever
  else uses it. This process: the producer, the fake microservice's threads and the polling.
- SQL statements: counted in the worker processes by SQLAlchemy engine events
  (``stock_sync.adapters.instrumentation``, enabled by ``STOCK_SYNC_COUNT_SQL_DIR``); this
  process's own are counted the same way, by label (producer / monitor), and reported separately.
- Transactions: ``xact_commit + xact_rollback`` of ``pg_stat_database`` for the benchmark
  database, minus this process's own. PostgreSQL publishes an idle backend's counts up to 10 s
  late, so the phase waits ~11 s before reading at either end (the CPU window excludes it).
- HTTP: counted by the fake microservice's state (a counting subclass, every contract request),
  PUTs checked against its ``fulfillment_requests()``.

Everything runs in a throwaway database and a queue of its own; the worker, the fake, the
database and the queue are removed on exit, Ctrl-C and SIGTERM included. Inherited
``STOCK_SYNC_*`` variables are ignored: the run measures the default settings plus its own
database, broker, queue, microservice URL and task-events setting. A missed target is printed
as MISSED and still exits 0 (a measurement, not a test); an error exits 1, Ctrl-C 130.
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
import threading
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
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from stock_sync.adapters import schema
from stock_sync.adapters.db import Database, normalise_database_url, reset_databases
from stock_sync.adapters.instrumentation import (
    COUNT_SQL_DIR_VARIABLE,
    LabelledSqlCounter,
    SqlCounts,
    read_count_files,
)
from stock_sync.adapters.instrumentation import install as count_own_sql
from stock_sync.adapters.instrumentation import total as sql_total
from stock_sync.adapters.instrumentation import uninstall as uninstall_sql_counter
from stock_sync.adapters.models import (
    OperationEvent,
    PendingStockOperation,
    StockLevel,
    StockMovement,
    utcnow,
)
from stock_sync.adapters.settings import ENV_PREFIX, Settings, get_settings
from stock_sync.adapters.stock_ledger import set_stock
from stock_sync.composition import build_services, reset_services
from stock_sync.devtools.fake_microservice import FakeMicroservice, RevisionForm, _FakeState
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.statuses import OperationStatus
from stock_sync.domain.stock import MovementReason
from stock_sync.producer import submit_operation
from stock_sync.services.metrics import collect_metrics
from stock_sync.services.reconciliation import reconcile
from stock_sync.services.stuck import is_stuck, stuck_window
from stock_sync.services.sweeps import StuckOperationSweeper
from tasks.app import app

REPOSITORY = Path(__file__).resolve().parents[2]
DEFAULT_ADMIN_URL = "postgresql+psycopg2://postgres@localhost:5432/postgres"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_ORDERS = 1000
DEFAULT_ROWS = 1_000_000
QUICK_ORDERS = 100
QUICK_ROWS = 10_000
DEFAULT_POOL = "prefork"
DEFAULT_CONCURRENCY = 2
DEFAULT_QUERY_RUNS = 9
DEFAULT_LATENCY_OPS = 500
QUICK_LATENCY_OPS = 50
QUICK_SOAK_OPS = 200
MAKE_SOAK_OPS = 20_000  # what ``make soak`` runs
SOAK_IN_FLIGHT = 40  # operations submitted and not yet finished, at most, during the soak
SOAK_SAMPLES = 100  # RSS samples over the soak
SOAK_WARM_UP_SHARE = 0.2  # the slope is fitted over the samples after this share of the soak
TASK_EVENTS_VARIABLE = "STOCK_SYNC_TASK_EVENTS"
# PostgreSQL (15+) publishes an idle backend's statistics at most 10 s after its last
# transaction: pg_stat_database is read this long after the activity it must include.
PG_STATS_SETTLE_S = 11.0
WORKER_APPLICATION_NAME = "stock-sync-bench-worker"
OWN_APPLICATION_NAME = "stock-sync-bench"
WARMUP_CHAINS = 20
WARMUP_ORDERS = 20
PIPELINE_SKUS = 100
HOT_SKU = "BENCH-HOT"
TERMINAL = (OperationStatus.COMPLETED, OperationStatus.FAILED, OperationStatus.CANCELLED)
ACCOUNT = "bench-shop"
ROWS_SPREAD_S = 30 * 86_400  # the finished operations are spread over the last 30 days
SWEEP_INDEX = "ix_pending_stock_operations_status_"  # status_dispatched_at, status_attempt_...
TABLES = (
    "operation_events",
    "stock_movements",
    "stock_levels",
    "pending_stock_operations",
    "metric_counters",
)
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
    if "/op" in unit or "/chain" in unit or unit.startswith("MB"):
        return f"{value:.2f} {unit}"
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


def with_application_name(url: str, name: str) -> str:
    """``url`` whose connections show ``name`` as their application_name in pg_stat_activity."""
    return (
        make_url(url)
        .update_query_dict({"application_name": name})
        .render_as_string(hide_password=False)
    )


def run_environment(
    database_url: str,
    broker_url: str,
    microservice_url: str,
    queue: str,
    data_dir: Path,
    task_events: str,
) -> dict[str, str]:
    """The STOCK_SYNC_* variables of the run, the same for the worker and this process (each
    then names its database connections: see ``worker_variables`` / ``own_variables``)."""
    return {
        f"{ENV_PREFIX}DATABASE_URL": database_url,
        f"{ENV_PREFIX}BROKER_URL": broker_url,
        f"{ENV_PREFIX}MICROSERVICE_URL": microservice_url,
        f"{ENV_PREFIX}QUEUE_NAME": queue,
        f"{ENV_PREFIX}LOG_LEVEL": "WARNING",
        f"{ENV_PREFIX}DATA_DIR": str(data_dir),
        TASK_EVENTS_VARIABLE: task_events,
    }


def worker_variables(run_variables: dict[str, str], count_sql_dir: Path) -> dict[str, str]:
    """The worker's: its connections named, and its SQL counted into ``count_sql_dir``."""
    url = run_variables[f"{ENV_PREFIX}DATABASE_URL"]
    return {
        **run_variables,
        f"{ENV_PREFIX}DATABASE_URL": with_application_name(url, WORKER_APPLICATION_NAME),
        COUNT_SQL_DIR_VARIABLE: str(count_sql_dir),
    }


def own_variables(run_variables: dict[str, str]) -> dict[str, str]:
    """This process's (producer, polling, sweeps, metrics): its connections named."""
    url = run_variables[f"{ENV_PREFIX}DATABASE_URL"]
    return {
        **run_variables,
        f"{ENV_PREFIX}DATABASE_URL": with_application_name(url, OWN_APPLICATION_NAME),
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
        super().__init__(
            [*arguments, "--include", "stock_sync.devtools.benchmark"], variables, log_path
        )

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
    """Delete the run's queues (its worker declares the maintenance queue too, named after the
    pipeline's), their bindings and the completion counters."""
    keys = [
        key
        for name in (queue, f"{queue}_maintenance")
        for key in (name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}")
    ]
    keys += [key.decode() for key in client.scan_iter(match=f"{done_prefix}*")]
    client.delete(*keys)


# --- measuring: CPU and memory from /proc, transactions, HTTP requests -----------------------

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    """What ``/proc/<pid>/stat`` says of a process: its CPU in clock ticks (``ticks``: utime +
    stime; ``reaped_ticks``: cutime + cstime, its children that exited and were waited for) and
    its start time (ticks after boot), which tells a reused pid apart."""

    pid: int
    comm: str
    ppid: int
    ticks: int
    reaped_ticks: int
    start: int


def read_stat(pid: int) -> ProcStat | None:
    """The process's stat, or None when it is gone (or not visible from here)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    close = raw.rindex(")")
    fields = raw[close + 2 :].split()  # fields[0] is field 3 of proc(5), "state"
    return ProcStat(
        pid=pid,
        comm=raw[raw.index("(") + 1 : close],
        ppid=int(fields[1]),
        ticks=int(fields[11]) + int(fields[12]),
        reaped_ticks=int(fields[13]) + int(fields[14]),
        start=int(fields[19]),
    )


def children_of(pid: int) -> list[int]:
    """The pids of the process's live children (``/proc/<pid>/task/*/children``, or a walk of
    /proc for their ppid where the kernel has no such file)."""
    tasks = Path(f"/proc/{pid}/task")
    if (tasks / str(pid) / "children").exists():
        found: list[int] = []
        with contextlib.suppress(OSError):
            for task in tasks.iterdir():
                with contextlib.suppress(OSError):
                    found += [int(child) for child in (task / "children").read_text().split()]
        return found
    candidates = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [child for child in candidates if (stat := read_stat(child)) and stat.ppid == pid]


def family_ticks(pid: int) -> tuple[int, int, int] | None:
    """(the process's own ticks, its children's ticks so far, live children): the children's
    count the live ones and those already reaped, so a child exiting in a phase is not lost."""
    parent = read_stat(pid)
    if parent is None:
        return None
    children = [stat for child in children_of(pid) if (stat := read_stat(child)) is not None]
    return parent.ticks, parent.reaped_ticks + sum(c.ticks for c in children), len(children)


def vm_rss_bytes(pid: int) -> int:
    """VmRSS of ``/proc/<pid>/status`` in bytes (0 when gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class RssSample:
    """The worker's VmRSS (bytes) once ``done`` operations had finished."""

    done: int
    parent: int
    children: int  # the sum over its live pool processes
    alive: int  # how many pool processes

    @property
    def total(self) -> int:
        return self.parent + self.children


def worker_rss(pid: int, done: int) -> RssSample:
    children = children_of(pid)
    return RssSample(
        done, vm_rss_bytes(pid), sum(vm_rss_bytes(child) for child in children), len(children)
    )


def _ms(ticks: float) -> float:
    return ticks * 1000 / CLOCK_TICKS_PER_S


BackendKey = tuple[int, int]  # (pid, start time): a pid reused by a new backend is another one


@dataclass(frozen=True)
class CpuSnapshot:
    """Cumulative CPU ticks of every process the benchmark accounts for, at one moment."""

    worker_parent: int
    worker_children: int
    worker_children_alive: int
    backends: dict[BackendKey, tuple[str, int]]  # role (worker/benchmark/other), ticks
    postgres_server: int | None
    redis: int | None
    benchmark: int


@dataclass(frozen=True)
class CpuUse:
    """CPU milliseconds spent between two snapshots, by process (group)."""

    worker_parent_ms: float
    worker_children_ms: float
    worker_children_alive: int
    postgres_ms: dict[str, float]  # by role: worker, benchmark, other
    backends_kept: int
    backends_born: int
    backends_gone: int
    postgres_server_ms: float | None
    redis_ms: float | None
    benchmark_ms: float

    @property
    def total_ms(self) -> float:
        """Worker, the benchmark database's backends, Redis and this process (the whole
        server's row is left out: it holds the backends already counted)."""
        return (
            self.worker_parent_ms
            + self.worker_children_ms
            + sum(self.postgres_ms.values())
            + (self.redis_ms or 0.0)
            + self.benchmark_ms
        )


def cpu_use(before: CpuSnapshot, after: CpuSnapshot) -> CpuUse:
    postgres = dict.fromkeys(("worker", "benchmark", "other"), 0.0)
    kept = born = 0
    for key, (role, ticks) in after.backends.items():
        previous = before.backends.get(key)
        if previous is None:
            born += 1  # connected during the phase: all its CPU is the phase's
        else:
            kept += 1
        postgres[role] += _ms(ticks - (previous[1] if previous else 0))
    server = redis_ms = None
    if before.postgres_server is not None and after.postgres_server is not None:
        server = _ms(after.postgres_server - before.postgres_server)
    if before.redis is not None and after.redis is not None:
        redis_ms = _ms(after.redis - before.redis)
    return CpuUse(
        worker_parent_ms=_ms(after.worker_parent - before.worker_parent),
        worker_children_ms=_ms(after.worker_children - before.worker_children),
        worker_children_alive=after.worker_children_alive,
        postgres_ms=postgres,
        backends_kept=kept,
        backends_born=born,
        backends_gone=len(set(before.backends) - set(after.backends)),
        postgres_server_ms=server,
        redis_ms=redis_ms,
        benchmark_ms=_ms(after.benchmark - before.benchmark),
    )


class Probe:
    """Reads the CPU of the worker, PostgreSQL, Redis and this process, and the benchmark
    database's transaction count, through an admin connection (to another database, so that
    reading counts nothing in the benchmark database)."""

    def __init__(self, admin_url: str, database_name: str, client: redis.Redis) -> None:
        self._engine: Engine = create_engine(
            normalise_database_url(admin_url), isolation_level="AUTOCOMMIT"
        )
        self._database_name = database_name
        with self._engine.connect() as connection:
            own_backend = int(connection.scalar(text("SELECT pg_backend_pid()")) or 0)
        backend = read_stat(own_backend)
        postmaster = read_stat(backend.ppid) if backend is not None else None
        # None when PostgreSQL runs where this process cannot see it (another host, container)
        self.postmaster_pid = (
            postmaster.pid if postmaster and postmaster.comm == "postgres" else None
        )
        redis_pid = int(client.info("server").get("process_id", 0))
        redis_stat = read_stat(redis_pid)
        self.redis_pid = (
            redis_pid if redis_stat and redis_stat.comm.startswith("redis-server") else None
        )

    def close(self) -> None:
        self._engine.dispose()

    def _backends(self) -> dict[BackendKey, tuple[str, int]]:
        if self.postmaster_pid is None:
            return {}
        with self._engine.connect() as connection:
            rows = connection.execute(
                text("SELECT pid, application_name FROM pg_stat_activity WHERE datname = :name"),
                {"name": self._database_name},
            ).all()
        found: dict[BackendKey, tuple[str, int]] = {}
        for pid, application_name in rows:
            stat = read_stat(int(pid))
            if stat is None or stat.ppid != self.postmaster_pid:
                continue  # gone since (or its pid already reused)
            role = {WORKER_APPLICATION_NAME: "worker", OWN_APPLICATION_NAME: "benchmark"}.get(
                application_name, "other"
            )
            found[(stat.pid, stat.start)] = (role, stat.ticks)
        return found

    def _postgres_server(self) -> int | None:
        if self.postmaster_pid is None:
            return None
        family = family_ticks(self.postmaster_pid)
        return None if family is None else family[0] + family[1]

    def cpu(self, worker_pid: int) -> CpuSnapshot:
        worker = family_ticks(worker_pid)
        if worker is None:
            raise BenchmarkError(f"the worker (pid {worker_pid}) is gone")
        redis_stat = read_stat(self.redis_pid) if self.redis_pid else None
        own = read_stat(os.getpid())
        return CpuSnapshot(
            worker_parent=worker[0],
            worker_children=worker[1],
            worker_children_alive=worker[2],
            backends=self._backends(),
            postgres_server=self._postgres_server(),
            redis=redis_stat.ticks if redis_stat else None,
            benchmark=own.ticks if own else 0,
        )

    def transactions(self) -> int:
        """xact_commit + xact_rollback of the benchmark database, as published so far."""
        with self._engine.connect() as connection:
            value = connection.scalar(
                text(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :name"
                ),
                {"name": self._database_name},
            )
        return int(value or 0)

    def settled_transactions(self) -> int:
        """The transaction count once every backend has published its statistics: read
        ``PG_STATS_SETTLE_S`` after the last activity, then until two reads agree."""
        time.sleep(PG_STATS_SETTLE_S)
        previous = self.transactions()
        for _ in range(20):
            time.sleep(0.5)
            current = self.transactions()
            if current == previous:
                return current
            previous = current
        raise BenchmarkError("pg_stat_database kept changing while the benchmark was idle")


@dataclass(frozen=True)
class HttpCounts:
    """Contract requests the fake microservice served: all of them, GETs and PUTs."""

    requests: int = 0
    gets: int = 0
    puts: int = 0

    def __sub__(self, other: HttpCounts) -> HttpCounts:
        return HttpCounts(
            self.requests - other.requests, self.gets - other.gets, self.puts - other.puts
        )


class _CountingFakeState(_FakeState):
    """The fake's state, counting the contract requests it is asked to answer: every one draws
    its faults first (``draw_fault``), then a GET reads an order, a PUT applies a fulfillment
    (or is recorded as faulted)."""

    def __init__(self, seed: int, revision_form: RevisionForm) -> None:
        super().__init__(seed, revision_form)
        self._counts_lock = threading.Lock()
        self._requests = self._gets = self._puts = 0

    def counts(self) -> HttpCounts:
        with self._counts_lock:
            return HttpCounts(self._requests, self._gets, self._puts)

    def draw_fault(self) -> Any:
        with self._counts_lock:
            self._requests += 1
        return super().draw_fault()

    def get_order(self, order_id: str) -> Any:
        with self._counts_lock:
            self._gets += 1
        return super().get_order(order_id)

    def put_fulfillment(self, order_id: str, idempotency_key: str | None, raw: bytes) -> Any:
        with self._counts_lock:
            self._puts += 1
        return super().put_fulfillment(order_id, idempotency_key, raw)

    def record_faulted_put(
        self, order_id: str, idempotency_key: str | None, raw: bytes, status: int
    ) -> None:
        with self._counts_lock:
            self._puts += 1
        super().record_faulted_put(order_id, idempotency_key, raw, status)


class CountingFakeMicroservice(FakeMicroservice):
    """The fake microservice, unchanged, with its requests counted (``http_counts``)."""

    def __init__(self) -> None:
        super().__init__()
        self._counting_state = _CountingFakeState(seed=0, revision_form="string")
        self._state = self._counting_state

    def http_counts(self) -> HttpCounts:
        return self._counting_state.counts()


@dataclass(frozen=True)
class Tally:
    """The counters at one moment: the worker's SQL (its count files), this process's SQL by
    label, and the fake's HTTP requests."""

    worker_sql: SqlCounts
    own_sql: dict[str, SqlCounts]
    http: HttpCounts
    puts_recorded: int


@dataclass(frozen=True)
class PhaseCounts:
    """What a phase of ``operations`` operations did, counted."""

    operations: int
    worker_sql: SqlCounts
    own_sql: dict[str, SqlCounts]
    http: HttpCounts
    puts_recorded: int
    pg_transactions: int  # pg_stat_database delta, this process's included

    @property
    def own_transactions(self) -> int:
        return sum(counts.transactions for counts in self.own_sql.values())

    @property
    def worker_transactions(self) -> int:
        """pg_stat_database's count minus this process's own."""
        return self.pg_transactions - self.own_transactions

    def own(self, label: str) -> SqlCounts:
        return self.own_sql.get(label, SqlCounts())


def phase_counts(before: Tally, after: Tally, pg_transactions: int, operations: int) -> PhaseCounts:
    labels = set(before.own_sql) | set(after.own_sql)
    own = {
        label: after.own_sql.get(label, SqlCounts()) - before.own_sql.get(label, SqlCounts())
        for label in sorted(labels)
    }
    return PhaseCounts(
        operations=operations,
        worker_sql=after.worker_sql - before.worker_sql,
        own_sql=own,
        http=after.http - before.http,
        puts_recorded=after.puts_recorded - before.puts_recorded,
        pg_transactions=pg_transactions,
    )


# --- what the phases share -------------------------------------------------------------------


@dataclass(frozen=True)
class Rig:
    """What the worker phases share: the broker client, the worker's variables, the fake, the
    database, a scratch folder, the prefix of the run's Redis keys, the probe, this process's
    SQL counter and the folder of the worker's SQL count files."""

    client: redis.Redis
    variables: dict[str, str]
    fake: CountingFakeMicroservice
    database: Database
    workdir: Path
    done_prefix: str
    probe: Probe
    own_sql: LabelledSqlCounter
    count_sql_dir: Path

    def tally(self) -> Tally:
        return Tally(
            worker_sql=sql_total(read_count_files(self.count_sql_dir)),
            own_sql=self.own_sql.counts(),
            http=self.fake.http_counts(),
            puts_recorded=len(self.fake.fulfillment_requests()),
        )


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


@dataclass(frozen=True)
class BaselineRun:
    chains: int
    chains_per_s: float
    cpu: CpuUse


def baseline_phase(rig: Rig, count: int, worker: WorkerProcess) -> BaselineRun:
    """Warm the worker up (also proves it consumes), then measure chains per second and the
    CPU of the measured chains."""
    say(f"    waiting for the worker (pid {worker.pid}) with {WARMUP_CHAINS} warm-up chains")
    run_chains(rig.client, f"{rig.done_prefix}warmup", WARMUP_CHAINS, worker)
    before = rig.probe.cpu(worker.pid)
    rate = run_chains(rig.client, f"{rig.done_prefix}baseline", count, worker)
    after = rig.probe.cpu(worker.pid)
    return BaselineRun(count, rate, cpu_use(before, after))


# --- phases 2 to 5: the pipeline --------------------------------------------------------


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


def pipeline_skus() -> list[str]:
    return [f"BENCH-P{index:03d}" for index in range(PIPELINE_SKUS)]


def _status_counts(session: Session) -> dict[str, int]:
    op = PendingStockOperation
    rows = session.execute(select(op.status, func.count()).group_by(op.status))
    return {str(status): int(count) for status, count in rows}


def _lowest(current: int | None, seen: int | None) -> int | None:
    if seen is None:
        return current
    return seen if current is None else min(current, seen)


def wait_for_operations(
    rig: Rig, total: int, worker: WorkerProcess, watch_sku: str | None = None
) -> tuple[dict[str, int], int | None]:
    """Poll until ``total`` operations are terminal; their counts by status, and the lowest
    level of ``watch_sku`` seen meanwhile (None when not watched)."""
    terminal = {s.value for s in TERMINAL}
    progress = Progress("operations finished", total)
    timeout_s = 60 + total * 0.3
    deadline = time.monotonic() + timeout_s
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
        worker.check_alive()
        if time.monotonic() > deadline:
            raise BenchmarkError(f"operations not finished after {timeout_s:.0f} s: {counts}")
        time.sleep(0.1)


def _last_completion(rig: Rig) -> datetime | None:
    with rig.own_sql.labelled("monitor"), rig.database.transaction() as session:
        return session.scalar(select(func.max(PendingStockOperation.completed_at)))


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


def submit(rig: Rig, order_id: str) -> None:
    """``submit_operation`` as the shop would call it; its SQL counted as the producer's."""
    with rig.own_sql.labelled("producer"):
        submit_operation(order_id, ACCOUNT)


def run_orders(
    rig: Rig,
    orders: Sequence[tuple[str, str]],
    worker: WorkerProcess,
    watch_sku: str | None = None,
) -> PipelineRun:
    """Submit ``orders`` ((order_id, sku), one unit each; stock them first) on empty operation
    tables and wait until all are terminal; the rate counts completed operations from the
    first submit to the last ``completed_at``."""
    for order_id, sku in orders:
        rig.fake.add_order(order_body(order_id, sku))
    started = utcnow()
    progress = Progress("submitted", len(orders))
    for index, (order_id, _) in enumerate(orders, start=1):
        submit(rig, order_id)
        progress.update(index)
    progress.finish(len(orders))
    counts, lowest = wait_for_operations(rig, len(orders), worker, watch_sku)
    completed = counts.get(OperationStatus.COMPLETED.value, 0)
    last = _last_completion(rig)
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


def warm_up_pipeline(rig: Rig, worker: WorkerProcess) -> None:
    """A few orders so every worker child has its connections; the tables are emptied after."""
    stock_skus(rig.database, {"BENCH-WARM": WARMUP_ORDERS})
    orders = [(f"bench-warm-{i}", "BENCH-WARM") for i in range(WARMUP_ORDERS)]
    run = run_orders(rig, orders, worker)
    if run.not_completed:
        raise BenchmarkError(f"{run.not_completed} warm-up orders did not complete")
    reset_tables(rig.database)


@dataclass(frozen=True)
class MeasuredPipeline:
    run: PipelineRun
    cpu: CpuUse
    counts: PhaseCounts
    retries: dict[str, int]  # retries scheduled, by error type


def pipeline_phase(rig: Rig, count: int, worker: WorkerProcess) -> MeasuredPipeline:
    """``count`` one-line orders over a pool of SKUs stocked far above demand, with the CPU
    they took and the SQL, transactions and HTTP requests they caused."""
    skus = pipeline_skus()
    stock_skus(rig.database, dict.fromkeys(skus, 1_000_000))
    say(f"    letting PostgreSQL publish its statistics ({PG_STATS_SETTLE_S:.0f} s)")
    transactions_before = rig.probe.settled_transactions()
    tally_before = rig.tally()
    cpu_before = rig.probe.cpu(worker.pid)
    orders = [(f"bench-p-{i}", skus[i % PIPELINE_SKUS]) for i in range(count)]
    run = run_orders(rig, orders, worker)
    cpu_after = rig.probe.cpu(worker.pid)
    say(f"    letting PostgreSQL publish its statistics ({PG_STATS_SETTLE_S:.0f} s)")
    transactions_after = rig.probe.settled_transactions()
    counts = phase_counts(
        tally_before, rig.tally(), transactions_after - transactions_before, run.submitted
    )
    retries = retries_scheduled(rig)
    reset_tables(rig.database)
    return MeasuredPipeline(run, cpu_use(cpu_before, cpu_after), counts, retries)


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


def latency_phase(rig: Rig, count: int, rate: float, worker: WorkerProcess) -> LatencyRun:
    """``count`` orders submitted at a steady ``rate`` per second (each at its due time,
    whatever the previous ones did: an open loop), then their ``completed_at - created_at``."""
    skus = pipeline_skus()
    stock_skus(rig.database, dict.fromkeys(skus, 1_000_000))
    orders = [(f"bench-l-{i}", skus[i % PIPELINE_SKUS]) for i in range(count)]
    for order_id, sku in orders:
        rig.fake.add_order(order_body(order_id, sku))
    progress = Progress("submitted", count)
    lag = 0.0
    started = time.monotonic()
    for index, (order_id, _) in enumerate(orders):
        delay = started + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            lag = max(lag, -delay)
        submit(rig, order_id)
        progress.update(index + 1)
    progress.finish(count)
    counts, _ = wait_for_operations(rig, count, worker)
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
        completed=counts.get(OperationStatus.COMPLETED.value, 0),
        rate=rate,
        max_submit_lag_ms=lag * 1000,
        latencies_ms=latencies,
        retries=retries,
    )


def distinct_skus_run(
    rig: Rig, count: int, worker: WorkerProcess
) -> tuple[PipelineRun, StockCheck]:
    """``count`` orders of one unit, each on its own SKU stocked with exactly 1."""
    initial = {f"BENCH-D{index:05d}": 1 for index in range(count)}
    stock_skus(rig.database, initial)
    orders = [(f"bench-d-{i}", sku) for i, sku in enumerate(sorted(initial))]
    run = run_orders(rig, orders, worker)
    check = check_stock(rig.database, initial)
    reset_tables(rig.database)
    return run, check


def hot_sku_run(rig: Rig, count: int, worker: WorkerProcess) -> tuple[PipelineRun, StockCheck]:
    """``count`` orders of one unit on one SKU stocked with exactly ``count``."""
    initial = {HOT_SKU: count}
    stock_skus(rig.database, initial)
    orders = [(f"bench-h-{i}", HOT_SKU) for i in range(count)]
    run = run_orders(rig, orders, worker, watch_sku=HOT_SKU)
    check = check_stock(rig.database, initial)
    reset_tables(rig.database)
    return run, check


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


def least_squares_slope(points: Sequence[tuple[float, float]]) -> float:
    """The slope of the least-squares line through ``points`` (0 with fewer than two x)."""
    if len({x for x, _ in points}) < 2:
        return 0.0
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in points)
    variance = sum((x - mean_x) ** 2 for x, _ in points)
    return covariance / variance


_NOT_FINISHED = [s.value for s in OperationStatus if s not in TERMINAL]


def _unfinished(rig: Rig) -> int:
    """Operations not terminal yet (a handful: an index scan of the status index)."""
    op = PendingStockOperation
    with rig.own_sql.labelled("monitor"), rig.database.transaction() as session:
        return int(session.scalar(select(func.count()).where(op.status.in_(_NOT_FINISHED))) or 0)


def soak_phase(rig: Rig, count: int, worker: WorkerProcess) -> SoakRun:
    """``count`` orders kept flowing (at most ``SOAK_IN_FLIGHT`` unfinished at a time) while
    the worker's RSS is sampled about ``SOAK_SAMPLES`` times."""
    skus = pipeline_skus()
    stock_skus(rig.database, dict.fromkeys(skus, 1_000_000))
    every = max(1, count // SOAK_SAMPLES)
    samples = [worker_rss(worker.pid, 0)]
    progress = Progress("operations finished", count)
    deadline = time.monotonic() + 120 + count * 0.3
    started = time.monotonic()
    submitted = done = 0
    while done < count:
        while submitted < count and submitted - done < SOAK_IN_FLIGHT:
            order_id = f"bench-s-{submitted}"
            rig.fake.add_order(order_body(order_id, skus[submitted % PIPELINE_SKUS]))
            submit(rig, order_id)
            submitted += 1
        time.sleep(0.05)
        done = submitted - _unfinished(rig)
        progress.update(done)
        if done >= samples[-1].done + every or done >= count:
            samples.append(worker_rss(worker.pid, done))
        worker.check_alive()
        if time.monotonic() > deadline:
            raise BenchmarkError(f"the soak finished only {done}/{count} operations in time")
    seconds = time.monotonic() - started
    progress.finish(done)
    with rig.own_sql.labelled("monitor"), rig.database.transaction() as session:
        completed = _status_counts(session).get(OperationStatus.COMPLETED.value, 0)
    reset_tables(rig.database)
    return SoakRun(count, completed, seconds, samples)


# --- phase 6: the queries on a big table ------------------------------------------------------

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
    task_events: Literal["on", "off"] = "off"
    latency_ops: int = DEFAULT_LATENCY_OPS
    soak: int = 0
    soak_only: bool = False


@dataclass
class Results:
    """Everything a run measured; ``metrics`` in the order they are printed, ``notes`` on how
    (printed after the table)."""

    options: Options
    metrics: list[Metric] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sweep_plan: str = ""
    task_events_effective: dict[str, bool] = field(default_factory=dict)
    rss_samples: list[RssSample] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": {
                "orders": self.options.orders,
                "rows": self.options.rows,
                "pool": self.options.pool,
                "concurrency": self.options.concurrency,
                "query_runs": self.options.query_runs,
                "task_events": self.options.task_events,
                "latency_ops": self.options.latency_ops,
                "soak": self.options.soak,
                "soak_only": self.options.soak_only,
            },
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


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def cpu_metrics(phase: str, use: CpuUse, count: int, unit: str) -> list[Metric]:
    """CPU milliseconds per chain / operation of a phase, by process (group)."""

    def per(ms: float) -> float:
        return ms / max(count, 1)

    pg = use.postgres_ms
    backends = (
        f"{use.backends_kept} backends there at both ends, {use.backends_born} connected "
        f"during the phase, {use.backends_gone} gone (their CPU lost); other backends "
        f"(autovacuum...) {per(pg['other']):.2f} {unit}"
    )
    metrics = [
        Metric(f"{phase}_cpu_worker_parent", per(use.worker_parent_ms), unit),
        Metric(
            f"{phase}_cpu_worker_children",
            per(use.worker_children_ms),
            unit,
            note=f"{use.worker_children_alive} pool processes alive at the end, "
            "plus any that exited",
        ),
    ]
    if use.postgres_server_ms is not None:  # PostgreSQL's processes are visible from here
        metrics += [
            Metric(
                f"{phase}_cpu_postgres_worker",
                per(pg["worker"]),
                unit,
                note="the worker's backends; " + backends,
            ),
            Metric(
                f"{phase}_cpu_postgres_benchmark",
                per(pg["benchmark"]),
                unit,
                note="this process's backends: producer and polling",
            ),
            Metric(
                f"{phase}_cpu_postgres_server",
                per(use.postgres_server_ms),
                unit,
                note="every process of the PostgreSQL server, any database, exited ones "
                "included: meaningful only if nothing else uses the server",
            ),
        ]
    if use.redis_ms is not None:
        metrics.append(
            Metric(
                f"{phase}_cpu_redis",
                per(use.redis_ms),
                unit,
                note="the redis-server process (shared with anything else using it)",
            )
        )
    metrics += [
        Metric(
            f"{phase}_cpu_benchmark",
            per(use.benchmark_ms),
            unit,
            note="this process: producer, fake microservice, polling",
        ),
        Metric(
            f"{phase}_cpu_total",
            per(use.total_ms),
            unit,
            note="worker parent + children + the benchmark database's backends + Redis + "
            "this process",
        ),
    ]
    return metrics


def baseline_metrics(baseline: BaselineRun) -> list[Metric]:
    return [
        Metric(
            "baseline_chains_per_s",
            baseline.chains_per_s,
            "chains/s",
            note="4 no-op tasks per chain",
        ),
        *cpu_metrics("baseline", baseline.cpu, baseline.chains, "ms/chain"),
    ]


def pipeline_metrics(baseline: BaselineRun, measured: MeasuredPipeline) -> list[Metric]:
    pipeline = measured.run
    return [
        Metric("pipeline_ops_per_s", pipeline.ops_per_s, "ops/s"),
        Metric(
            "pipeline_vs_baseline",
            _ratio(pipeline.ops_per_s, baseline.chains_per_s),
            "ratio",
            Target(">=", 0.60),
        ),
        Metric("pipeline_not_completed", pipeline.not_completed, "ops", Target("==", 0)),
        retries_metric("pipeline_retries_scheduled", measured.retries),
        *cpu_metrics("pipeline", measured.cpu, pipeline.submitted, "ms/op"),
        *counted_metrics(measured.counts),
    ]


def counted_metrics(counts: PhaseCounts) -> list[Metric]:
    """SQL statements, transactions and HTTP requests per operation of the pipeline phase."""
    ops = max(counts.operations, 1)
    producer = counts.own("producer")
    monitor = counts.own("monitor")
    worker_events = counts.worker_sql.transactions
    return [
        Metric(
            "pipeline_sql_statements_per_op",
            counts.worker_sql.statements / ops,
            "stmts/op",
            note="sent by the worker processes (SQLAlchemy before_cursor_execute; psycopg2's "
            "BEGIN and the COMMIT not included)",
        ),
        Metric(
            "pipeline_transactions_per_op",
            counts.worker_transactions / ops,
            "xacts/op",
            note=f"pg_stat_database: {counts.pg_transactions} minus this process's "
            f"{counts.own_transactions}; the worker's SQLAlchemy commit/rollback events: "
            f"{worker_events} ({worker_events / ops:.2f}/op)",
        ),
        Metric(
            "pipeline_producer_statements_per_op",
            producer.statements / ops,
            "stmts/op",
            note=f"submit_operation in this process; its polling sent {monitor.statements} "
            f"statements in {monitor.transactions} transactions, not counted here",
        ),
        Metric(
            "pipeline_producer_transactions_per_op",
            producer.transactions / ops,
            "xacts/op",
        ),
        Metric(
            "pipeline_http_requests_per_op",
            counts.http.requests / ops,
            "req/op",
            note="contract requests the fake microservice served",
        ),
        Metric("pipeline_http_gets_per_op", counts.http.gets / ops, "req/op"),
        Metric(
            "pipeline_http_puts_per_op",
            counts.http.puts / ops,
            "req/op",
            note=f"the fake recorded {counts.puts_recorded} PUTs",
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
            note="how late the submitter ran behind its schedule, at worst",
        ),
        Metric("latency_p50_ms", latency.percentile(0.50), "ms", note=where),
        Metric("latency_p95_ms", latency.percentile(0.95), "ms", note=where),
        Metric("latency_p99_ms", latency.percentile(0.99), "ms", note=where),
        Metric(
            "latency_not_completed",
            latency.submitted - latency.completed,
            "ops",
            Target("==", 0),
        ),
        retries_metric("latency_retries_scheduled", latency.retries),
    ]


def soak_metrics(soak: SoakRun) -> list[Metric]:
    fitted = soak.fitted()
    first, last = fitted[0] if fitted else soak.samples[0], soak.samples[-1]
    return [
        Metric("soak_operations", soak.operations, "ops"),
        Metric("soak_ops_per_s", soak.completed / max(soak.seconds, 1e-6), "ops/s"),
        Metric(
            "soak_not_completed",
            soak.operations - soak.completed,
            "ops",
            Target("==", 0),
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


def phase_count(options: Options) -> int:
    if options.soak_only:
        return 1
    return 5 + (1 if options.soak else 0)


def measure_with_worker(options: Options, rig: Rig, results: Results) -> None:
    """The worker phases (1 to 5) with one worker, stopped before returning."""
    log_path = rig.workdir / "worker.log"
    total = phase_count(options)
    worker_settings = (
        f"{options.pool} pool, concurrency {options.concurrency}, task events {options.task_events}"
    )
    with running_worker(rig.variables, log_path, options.pool, options.concurrency) as worker:
        if options.soak_only:
            say(f"[1/1] soak: {options.soak} operations ({worker_settings})")
            warm_up_pipeline(rig, worker)
            soak = soak_phase(rig, options.soak, worker)
            results.metrics += soak_metrics(soak)
            results.rss_samples = soak.samples
            return
        say(f"[1/{total}] baseline: {options.orders} chains of 4 no-op tasks ({worker_settings})")
        baseline = baseline_phase(rig, options.orders, worker)
        say(f"    {baseline.chains_per_s:.1f} chains/s")
        results.metrics += baseline_metrics(baseline)
        results.notes.append(backends_note("baseline", baseline.cpu))
        say(
            f"[2/{total}] pipeline: {options.orders} orders with PostgreSQL and the fake "
            f"microservice ({worker_settings})"
        )
        warm_up_pipeline(rig, worker)
        measured = pipeline_phase(rig, options.orders, worker)
        say(f"    {measured.run.ops_per_s:.1f} operations/s")
        results.metrics += pipeline_metrics(baseline, measured)
        results.notes.append(backends_note("pipeline", measured.cpu))
        rate = max(measured.run.ops_per_s / 2, 0.5)
        say(f"[3/{total}] latency: {options.latency_ops} orders submitted at {rate:.1f}/s")
        latency = latency_phase(rig, options.latency_ops, rate, worker)
        say(
            f"    p50 {latency.percentile(0.5):.0f} ms, p95 {latency.percentile(0.95):.0f} ms, "
            f"p99 {latency.percentile(0.99):.0f} ms"
        )
        results.metrics += latency_metrics(latency)
        say(
            f"[4/{total}] contention: {options.orders} orders on distinct SKUs, then on one hot SKU"
        )
        distinct = distinct_skus_run(rig, options.orders, worker)
        say(f"    distinct SKUs: {distinct[0].ops_per_s:.1f} operations/s")
        hot = hot_sku_run(rig, options.orders, worker)
        say(f"    hot SKU: {hot[0].ops_per_s:.1f} operations/s")
        results.metrics += contention_metrics(distinct, hot)
        if options.soak:
            say(f"[5/{total}] soak: {options.soak} operations")
            soak = soak_phase(rig, options.soak, worker)
            say(f"    worker RSS slope {soak.slope_mb_per_10k():.2f} MB per 10,000 operations")
            results.metrics += soak_metrics(soak)
            results.rss_samples = soak.samples


def backends_note(phase: str, use: CpuUse) -> str:
    return (
        f"{phase}: PostgreSQL backends of the benchmark database: {use.backends_kept} there at "
        f"both ends, {use.backends_born} connected during the phase (counted whole), "
        f"{use.backends_gone} gone during it (their CPU lost); "
        f"{use.worker_children_alive} worker pool processes at the end"
    )


def measurement_notes(options: Options, results: Results, probe: Probe) -> list[str]:
    effective = results.task_events_effective
    events = ", ".join(f"{name}={value}" for name, value in effective.items())
    requested = options.task_events == "on"
    notes = [
        f"worker settings, the same for every phase: {options.pool} pool, concurrency "
        f"{options.concurrency}; {TASK_EVENTS_VARIABLE}={options.task_events} for the worker "
        f"and this process, which gives {events}",
    ]
    if any(value != requested for value in effective.values()):
        notes.append(
            f"WARNING: task events asked {options.task_events} but celeryconfig gives "
            f"{events}: this celeryconfig does not honour {TASK_EVENTS_VARIABLE} (yet)"
        )
    if options.soak:
        notes.append(
            "soak: worker RSS = VmRSS of the parent + each pool process (shared pages counted "
            "in each: the level overstates, the slope is what matters)"
            + (
                f"; over {options.soak} operations the slope is mostly warm-up noise "
                f"(make soak runs {MAKE_SOAK_OPS:,})"
                if options.soak < MAKE_SOAK_OPS // 4
                else ""
            )
        )
    else:
        notes.append(f"soak: not run (--soak N; make soak runs {MAKE_SOAK_OPS:,} operations)")
    if options.soak_only:
        return notes
    notes += [
        "CPU: utime+stime from /proc/<pid>/stat, before and after the measured phase, per "
        "chain or operation; worker children = live pool processes + reaped ones (the "
        "parent's cutime+cstime)",
        "postgres_worker / postgres_benchmark: backends of the benchmark database "
        "(pg_stat_activity), told apart by application_name; a backend that exits during the "
        "phase is lost (see each row's note in --json); postgres_server: every process of the "
        "server"
        + (
            f" (postmaster pid {probe.postmaster_pid})"
            if probe.postmaster_pid
            else " (not visible from here: row left out)"
        ),
        f"redis: redis-server pid {probe.redis_pid}"
        if probe.redis_pid
        else "redis: its process is not visible from here (row left out)",
        "SQL statements counted in the worker by SQLAlchemy events (STOCK_SYNC_COUNT_SQL_DIR); "
        "transactions from pg_stat_database minus this process's own, read after "
        f"{PG_STATS_SETTLE_S:.0f} s of quiet at both ends; HTTP counted by the fake",
    ]
    return notes


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
        fake = stack.enter_context(CountingFakeMicroservice())
        variables = run_environment(
            database_url, options.redis_url, fake.url, queue, workdir, options.task_events
        )
        count_sql_dir = workdir / "sql-counts"
        settings = configure_this_process(own_variables(variables))
        results.task_events_effective = {
            "worker_send_task_events": bool(app.conf.worker_send_task_events),
            "task_send_sent_event": bool(app.conf.task_send_sent_event),
        }
        database_name = str(make_url(database_url).database)
        own_sql = LabelledSqlCounter(database_name)
        count_own_sql(own_sql)
        stack.callback(uninstall_sql_counter)
        database = Database(settings.effective_database_url)
        stack.callback(database.dispose)
        probe = Probe(options.admin_url, database_name, client)
        stack.callback(probe.close)
        rig = Rig(
            client,
            worker_variables(variables, count_sql_dir),
            fake,
            database,
            workdir,
            done_prefix,
            probe,
            own_sql,
            count_sql_dir,
        )
        results.notes = measurement_notes(options, results, probe)
        say(results.notes[0])
        measure_with_worker(options, rig, results)
        fake.stop()
        if not options.soak_only:
            total = phase_count(options)
            say(f"[{total}/{total}] queries: {options.rows:,} finished operations")
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


def _not_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m stock_sync.devtools.benchmark",
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
    parser.add_argument(
        "--task-events",
        choices=("on", "off"),
        default="off",
        help=f"Celery task events for the worker and the producer, through "
        f"{TASK_EVENTS_VARIABLE} (default off)",
    )
    parser.add_argument(
        "--latency-ops",
        type=_positive,
        default=None,
        help=f"operations of the latency phase (default {DEFAULT_LATENCY_OPS}, "
        f"{QUICK_LATENCY_OPS} with --quick)",
    )
    parser.add_argument(
        "--soak",
        type=_not_negative,
        default=None,
        help=f"operations of the soak phase, 0 for none (default 0, {QUICK_SOAK_OPS} with "
        f"--quick; make soak runs {MAKE_SOAK_OPS:,})",
    )
    parser.add_argument(
        "--soak-only",
        action="store_true",
        help=f"run the soak alone (default {MAKE_SOAK_OPS:,} operations): no other phase",
    )
    args = parser.parse_args(argv)
    soak = args.soak
    if soak is None:
        soak = MAKE_SOAK_OPS if args.soak_only else QUICK_SOAK_OPS if args.quick else 0
    if args.soak_only and soak == 0:
        parser.error("--soak-only needs a soak of at least one operation")
    return Options(
        orders=args.orders or (QUICK_ORDERS if args.quick else DEFAULT_ORDERS),
        rows=args.rows or (QUICK_ROWS if args.quick else DEFAULT_ROWS),
        pool=args.pool,
        concurrency=args.concurrency,
        query_runs=args.runs,
        admin_url=args.postgres_url,
        redis_url=args.redis_url,
        json_output=args.json,
        task_events=args.task_events,
        latency_ops=args.latency_ops or (QUICK_LATENCY_OPS if args.quick else DEFAULT_LATENCY_OPS),
        soak=soak,
        soak_only=args.soak_only,
    )


def report(results: Results) -> None:
    """The table (stdout, or stderr with --json), the JSON, and a clear MISSED summary."""
    table = results_table(results.metrics)
    missing = missed(results.metrics)
    verdict = (
        "MISSED: " + ", ".join(metric.name for metric in missing) if missing else "all targets met"
    )
    stream = sys.stderr if results.options.json_output else sys.stdout
    notes = "\n".join(f"- {note}" for note in results.notes)
    print(f"\n{table}\n\n{verdict}\n\nhow it was measured:\n{notes}", file=stream, flush=True)
    if results.options.json_output:
        print(json.dumps(results.to_dict(), indent=2))
    elif results.sweep_plan:
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

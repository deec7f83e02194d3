"""What a benchmark run stands on: a throwaway database, the processes it starts (a worker as
users run it, producer processes, the fake microservice in a process of its own), their
environment, and the progress lines on stderr. The chaos and memory tools share it."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import requests
from sqlalchemy import text
from sqlalchemy.engine import make_url

from stock_sync.adapters.db import Database, reset_databases
from stock_sync.adapters.settings import ENV_PREFIX, Settings, get_settings
from stock_sync.adapters.stock_ledger import set_stock
from stock_sync.composition import reset_services
from stock_sync_dev import databases, processes
from stock_sync_dev.bench import NOOP_TASKS_MODULE
from stock_sync_dev.bench.procstat import (
    HARNESS_APPLICATION_NAME,
    PRODUCER_APPLICATION_NAME,
    WORKER_APPLICATION_NAME,
)

REPOSITORY = processes.REPOSITORY
DEFAULT_ADMIN_URL = "postgresql+psycopg2://postgres@localhost:5432/postgres"
# A Redis database of the benchmark's own: Celery's remote control and events travel on pub/sub
# channels named after the database, and another tenant's Flower (which broadcasts
# enable_events to every worker it reaches) or `celery inspect` on database 0 turned task
# events on in the benchmark's worker mid-run (seen in a profile: a fifth of the worker main
# process's CPU publishing task.multi events).
DEFAULT_REDIS_URL = "redis://localhost:6379/13"
TASK_EVENTS_VARIABLE = "STOCK_SYNC_TASK_EVENTS"
KEY_TTL_S = 3600
TABLES = (
    "operation_events",
    "stock_movements",
    "stock_levels",
    "pending_stock_operations",
    "metric_counters",
)


class BenchmarkError(Exception):
    """A phase could not be measured (a process died, a timeout...): the run exits 1."""


# --- progress ---------------------------------------------------------------------------------


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


# --- the database -----------------------------------------------------------------------------


@contextlib.contextmanager
def throwaway_database(
    admin_url: str, *, prefix: str = "stock_sync_bench", create_options: str = ""
) -> Iterator[str]:
    """A new, migrated PostgreSQL database's URL; dropped (connections forced out) on exit.

    ``create_options`` is appended to CREATE DATABASE (a template, a locale, ...)."""
    with databases.throwaway_database(admin_url, prefix, create_options) as url:
        yield url


def reset_tables(database: Database) -> None:
    with database.transaction() as session:
        session.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))


def stock_skus(database: Database, levels: dict[str, int]) -> None:
    with database.transaction() as session:
        for sku, quantity in sorted(levels.items()):
            set_stock(session, sku, quantity)


# --- the environment of the run's processes ---------------------------------------------------


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
    """The STOCK_SYNC_* variables of the run, the same for every process (each then names its
    database connections: see ``role_variables``)."""
    return {
        f"{ENV_PREFIX}DATABASE_URL": database_url,
        f"{ENV_PREFIX}BROKER_URL": broker_url,
        f"{ENV_PREFIX}MICROSERVICE_URL": microservice_url,
        f"{ENV_PREFIX}QUEUE_NAME": queue,
        f"{ENV_PREFIX}LOG_LEVEL": "WARNING",
        f"{ENV_PREFIX}DATA_DIR": str(data_dir),
        TASK_EVENTS_VARIABLE: task_events,
    }


def role_variables(
    run_variables: dict[str, str], application_name: str, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """``run_variables`` with the database connections named ``application_name``."""
    url = run_variables[f"{ENV_PREFIX}DATABASE_URL"]
    return {
        **run_variables,
        f"{ENV_PREFIX}DATABASE_URL": with_application_name(url, application_name),
        **(extra or {}),
    }


def without_stock_sync_variables(environment: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in environment.items() if not name.startswith(ENV_PREFIX)}


def process_environment(variables: Mapping[str, str]) -> dict[str, str]:
    """A run's process environment: this process's without its STOCK_SYNC_* variables, plus
    ``variables``."""
    return {**without_stock_sync_variables(dict(os.environ)), **variables}


def configure_this_process(variables: dict[str, str]) -> Settings:
    """Make this process (its sweeps, metrics, polling) use exactly ``variables``."""
    for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
        del os.environ[name]
    os.environ.update(variables)
    get_settings.cache_clear()
    # imported once the variables are set: both read the settings when first imported, and a
    # process without a database and a broker configured refuses to start
    import celeryconfig
    from tasks.app import app

    reset_services()
    reset_databases()
    settings = get_settings()
    app.conf.update(celeryconfig.build(settings))
    return settings


def harness_variables(run_variables: dict[str, str]) -> dict[str, str]:
    return role_variables(run_variables, HARNESS_APPLICATION_NAME)


# --- processes --------------------------------------------------------------------------------


class ChildProcess(processes.ChildProcess):
    """A process of the run (see ``stock_sync_dev.processes``): this process's environment
    without its STOCK_SYNC_* variables, plus ``variables``."""

    def __init__(
        self,
        command: Sequence[str],
        variables: dict[str, str],
        log_path: Path,
        *,
        stdin: int = subprocess.DEVNULL,
        stdout: int | None = None,
    ) -> None:
        environment = process_environment(variables)
        super().__init__(command, environment, log_path, stdin=stdin, stdout=stdout)

    def check_alive(self, name: str) -> None:
        """Raise BenchmarkError (with the end of its log) if the process has exited."""
        code = self.exit_code()
        if code is not None:
            raise BenchmarkError(f"the {name} exited with {code}:\n{self.log_tail()}")


class CeleryProcess(ChildProcess):
    """``python -m celery -A tasks <arguments>``."""

    def __init__(self, arguments: Sequence[str], variables: dict[str, str], log_path: Path) -> None:
        super().__init__(processes.celery_command(arguments), variables, log_path)


def tool_worker_arguments(pool: str, concurrency: int, hostname: str) -> list[str]:
    """``celery worker`` arguments of the chaos and memory tools: log level WARNING, no
    mingle, gossip or heartbeat."""
    return processes.worker_arguments(pool, concurrency, loglevel="WARNING", hostname=hostname)


class WorkerProcess(CeleryProcess):
    """The benchmark's worker as users run it (``celery -A tasks worker -c 2``, the project's
    configuration, heartbeats and gossip on, log level WARNING), with the bare chain's tasks
    included."""

    def __init__(
        self, variables: dict[str, str], log_path: Path, pool: str, concurrency: int
    ) -> None:
        hostname = f"bench-{uuid.uuid4().hex[:8]}@%h"
        arguments = processes.worker_arguments(
            pool, concurrency, "--include", NOOP_TASKS_MODULE,
            loglevel="WARNING", hostname=hostname, quiet=False,
        )  # fmt: skip
        super().__init__(arguments, variables, log_path)


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


# --- the fake microservice, in a process of its own -------------------------------------------

_LISTENING = "fake microservice listening on "


class FakeProcess(ChildProcess):
    """``stock-sync fake-microservice`` on a free port; orders added and requests counted
    through its admin API."""

    def __init__(self, log_path: Path, timeout_s: float = 30.0) -> None:
        command = [str(processes.STOCK_SYNC), "fake-microservice"]
        super().__init__([*command, "--port", "0"], {}, log_path)
        self.url = self._wait_for_url(timeout_s)
        self._session = requests.Session()

    def _wait_for_url(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith(_LISTENING):
                    return line.removeprefix(_LISTENING).strip()
            self.check_alive("fake microservice")
            time.sleep(0.05)
        raise BenchmarkError(f"the fake microservice did not start:\n{self.log_tail()}")

    def _call(self, method: str, path: str, payload: object = None) -> Any:
        response = self._session.request(method, f"{self.url}/_admin/{path}", json=payload)
        if response.status_code >= 300:
            raise BenchmarkError(f"fake {method} {path}: {response.status_code} {response.text}")
        return response.json()

    def add_orders(self, orders: Sequence[dict[str, Any]]) -> None:
        for start in range(0, len(orders), 1000):
            self._call("POST", "orders", {"orders": list(orders[start : start + 1000])})

    def contract_requests(self) -> dict[str, int]:
        counts: dict[str, int] = self._call("GET", "requests")["contract_requests"]
        return counts

    def applied_puts(self) -> int:
        fulfillments = self._call("GET", "fulfillments")["fulfillments"]
        return sum(1 for put in fulfillments if put["outcome"] == "applied")

    def stop(self, grace_s: float = 30.0) -> None:
        self._session.close()
        super().stop(grace_s)


# --- producer processes -----------------------------------------------------------------------


@dataclass(frozen=True)
class ProducerResult:
    """What a producer process reports: when its first submit started and its last ended
    (epoch seconds), how many it submitted, and how late it ran behind a rate, at worst."""

    started: float
    finished: float
    submitted: int
    max_lag_s: float

    @property
    def submit_rate(self) -> float:
        return self.submitted / max(self.finished - self.started, 1e-9)


class ProducerProcess(ChildProcess):
    """``python -m stock_sync_dev.bench.producer_main``: connects, says it is ready,
    waits for the go, submits, reports; exits once its stdin closes (its CPU is read before)."""

    def __init__(self, arguments: Sequence[str], variables: dict[str, str], log_path: Path) -> None:
        command = [sys.executable, "-m", "stock_sync_dev.bench.producer_main", *arguments]
        producer_variables = role_variables(variables, PRODUCER_APPLICATION_NAME)
        super().__init__(
            command,
            producer_variables,
            log_path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._selector = selectors.DefaultSelector()
        assert self.process.stdout is not None
        self._selector.register(self.process.stdout, selectors.EVENT_READ)

    def _read_line(self, timeout_s: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._selector.select(timeout=0.25):
                line = self.process.stdout.readline()
                if line:
                    message: dict[str, Any] = json.loads(line)
                    return message
            self.check_alive("producer")
        raise BenchmarkError(f"the producer did not answer in {timeout_s:.0f} s")

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        self._read_line(timeout_s)

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def result(self, timeout_s: float) -> ProducerResult:
        message = self._read_line(timeout_s)
        return ProducerResult(
            message["started"], message["finished"], message["submitted"], message["max_lag_s"]
        )

    def close(self) -> None:
        """Close its stdin (it exits), wait for it, free the pipes."""
        if self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
        self._selector.close()
        if self.process.stdout is not None:
            self.process.stdout.close()


def producer_variables(run_variables: dict[str, str], count_sql_dir: Path | None) -> dict[str, str]:
    """A producer's variables: SQL counted into ``count_sql_dir`` when given."""
    from stock_sync.adapters.instrumentation import COUNT_SQL_DIR_VARIABLE

    extra = {COUNT_SQL_DIR_VARIABLE: str(count_sql_dir)} if count_sql_dir else {}
    return {**run_variables, **extra}


def worker_variables(run_variables: dict[str, str], count_sql_dir: Path | None) -> dict[str, str]:
    """The worker's variables: its connections named, its SQL counted into ``count_sql_dir``
    when given (nothing is instrumented otherwise: the way users run it)."""
    from stock_sync.adapters.instrumentation import COUNT_SQL_DIR_VARIABLE

    extra = {COUNT_SQL_DIR_VARIABLE: str(count_sql_dir)} if count_sql_dir else {}
    return role_variables(run_variables, WORKER_APPLICATION_NAME, extra)

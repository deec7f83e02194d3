"""``python -m stock_sync_dev.chaos_partition [--orders N] [--json]`` (``make
chaos-partition``): stock-sync on separate hosts, and the links between them cut while orders
flow.

The hosts are Linux network namespaces made by the suite (``netns``), joined by a switch:

    db      198.18.0.2   a private PostgreSQL 15 cluster (``initdb`` in a temporary folder, run
                         as the postgres user) and a private ``redis-server``, both listening
                         on this address only
    shop    198.18.0.10  this process: the producer (``submit_operation``), the operator's
                         cancels, the suite's own probes
    w1, w2  198.18.0.11-12  a ``celery -A tasks worker`` each (prefork, 2 processes)
    w3      198.18.0.13  a worker with a thread pool (2), on a link that can delay and lose
    beat    198.18.0.20  ``celery -A tasks beat``
    micro   198.18.0.30  the fake microservice (``stock-sync fake-microservice``)

No host has a route anywhere else: the producer itself runs inside ``shop``, where
``localhost:5432`` is nobody, so nothing can take a loopback shortcut to the machine's own
services. Every process gets its STOCK_SYNC_* variables pointing at the db host's addresses.

While the orders are submitted (at most ``--rate`` a second), four partitions begin one after
another, ``--gap`` seconds apart, and are all healed together ``--hold`` seconds after the
last began:

1. **w2 cut off from the database in the middle of a stage**: the suite takes the stock rows'
   locks, waits until one of w2's deductions is blocked behind them (``pg_stat_activity``,
   ``pg_blocking_pids``), cuts w2 from PostgreSQL's port and lets the rows go. The server runs
   w2's statement and sends the answer into the void; the transaction stays open on the
   server, holding its row locks, until the heal. How long it stays open is measured.
2. **the microservice cut off from every worker** (the shop still reaches it).
3. **w1 cut off from the broker while it holds unacknowledged messages**: Celery's
   ``inspect`` names the tasks w1 holds, the broker's ``unacked`` hash must hold them too, and
   after the cut they must still be there (w1 can no longer acknowledge them).
4. **w3's link slowed**: every frame delayed 200 ms and 5% lost, both ways.

A cut drops frames in the switch (nftables), silently both ways: no reset, no ICMP, the link
stays up, as a partition does it (see ``netns``). After the heal the suite waits until every
worker answers through the broker and works again (``heal_s``), lets the run settle until
every operation is terminal (``settle_s``, from the heal), stops the Celery processes and
judges the same invariants as ``make chaos`` (``chaos_checks``), plus that every worker came
back. One summary line ends the run (``--json``: the report as JSON on stdout).

Exit codes: 0 every assertion holds; 1 an assertion is violated; 2 the harness failed (also:
namespaces cannot be made here, said in one line); 130 interrupted. Everything the suite made
(namespaces, links, processes, the temporary folder) is removed at the end, also on failure,
Ctrl-C or SIGTERM; what a SIGKILLed run left is removed by the next run's start.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psycopg2
import redis
from sqlalchemy.engine import make_url

from stock_sync.adapters import schema
from stock_sync.adapters.db import Database, reset_databases
from stock_sync.adapters.settings import ENV_PREFIX
from stock_sync.domain.statuses import OperationStatus
from stock_sync.entrypoints import render
from stock_sync.services.queries import operation_details
from stock_sync_dev import chaos_checks, chaos_verdict, cli_args, netns, processes
from stock_sync_dev.bench.harness import (
    REPOSITORY,
    configure_this_process,
    process_environment,
    run_environment,
    say,
    stock_skus,
    tool_worker_arguments,
    with_application_name,
)
from stock_sync_dev.chaos import ICU_EN_US, shortened_timeline, status_counts
from stock_sync_dev.chaos_checks import Assertion, Snapshot
from stock_sync_dev.chaos_faults import (
    Agent,
    HarnessError,
    Operator,
    ProducerTally,
    Submitter,
    agent_errors,
    redis_queue_length,
    stop_agents,
)
from stock_sync_dev.chaos_scenario import Scenario, build_scenario
from stock_sync_dev.chaos_verdict import (
    EXIT_HARNESS_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_VIOLATED,
    SuiteReport,
)


def _app() -> Any:
    """The Celery app, imported once this process is configured (it refuses to start
    without a database and a broker)."""
    from tasks.app import app

    return app


DEFAULT_ORDERS = 1000
DEFAULT_SEED = 1

# The hosts: name -> last byte of the address.
DB, SHOP, W1, W2, W3, BEAT, MICRO = "db", "shop", "w1", "w2", "w3", "beat", "micro"
HOST_NUMBERS = {DB: 2, SHOP: 10, W1: 11, W2: 12, W3: 13, BEAT: 20, MICRO: 30}
WORKERS = (W1, W2, W3)
WORKER_POOLS = {W1: "prefork", W2: "prefork", W3: "threads"}
CONCURRENCY = 2
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_PORT, REDIS_PORT, MICRO_PORT = 5432, 6379, 8765
DATABASE_NAME = "stock_sync"
PG_USER = "postgres"

# The run's pace and the partitions' timing (``--rate``, ``--gap``, ``--hold``).
SUBMITS_PER_S = 8.0
MAX_BACKLOG = 30
PARTITIONS_FROM = 0.1  # the first partition begins once this share of the orders is submitted
GAP_S = 10.0
HOLD_S = 40.0
SLOW_LINK_DELAY_S = 0.2
SLOW_LINK_LOSS = 0.05
CANCEL_SHARE = 0.05
TAIL_S = 3.0
FORCE_TIMEOUT_S = 60.0  # to catch w2 inside a transaction, w1 holding messages
LOCK_WINDOW_S = 3.0  # the stock rows are held this long at most per try
HEAL_TIMEOUT_S = 180.0
PROGRESS_EVERY_S = 10.0
SETTLE_TIMEOUT_BASE_S = 180.0
SETTLE_TIMEOUT_PER_ORDER_S = 0.1
START_TIMEOUT_S = 60.0
UNACKED_KEY = "unacked"  # kombu's Redis transport keeps delivered, unacknowledged messages here

# Backoffs long enough, and budgets large enough, that an operation outlives a partition of
# ``HOLD_S`` and more without spending its retries (the FAILED ones must be those that ran
# short of stock, as in ``make chaos``); the microservice's timeout above a 400 ms round trip.
PARTITION_SETTINGS = {
    "MICROSERVICE_TIMEOUT_S": "2",
    "MICROSERVICE_DEADLINE_S": "6",
    "RETRY_BACKOFF_BASE_S": "0.5",
    "RETRY_BACKOFF_MAX_S": "5",
    "MAX_RETRIES_PENDING": "30",
    "MAX_RETRIES_PROCESSING": "10",
    "MAX_RETRIES_DEDUCTION": "12",
    "MAX_RETRIES_STOCK_DEDUCTED": "30",
    "MAX_RETRIES_ROLLBACK": "40",
    # The stuck threshold must exceed the hard time limit plus the microservice deadline (a
    # running attempt is never taken for a dead one); a lost message is found once a probe
    # sent after it came through TASK_TIME_LIMIT_S ago.
    "TASK_SOFT_TIME_LIMIT_S": "8",
    "TASK_TIME_LIMIT_S": "10",
    "SWEEP_INTERVAL_S": "2",
    "STUCK_AFTER_S": "16",
    "RETRY_RELEASE_INTERVAL_S": "1",
    "ALERT_INTERVAL_S": "3600",
}
RETRY_BUDGETS = chaos_verdict.retry_budgets(PARTITION_SETTINGS)
# The fake's per-order faults of the chaos scenario, but no held PUTs (nothing here releases
# them): late payment, answers lost after the PUT took effect.
DROPPED_KNOBS = ("hold_puts",)


@dataclass(frozen=True)
class Options:
    orders: int
    seed: int
    json_output: bool
    rate: float
    gap_s: float
    hold_s: float
    backoff_max_s: float
    settle_timeout_s: float
    database_options: str
    evidence_dir: Path | None


# --- processes on the hosts -------------------------------------------------------------------


class HostProcess(processes.ChildProcess):
    """A command run in a host's namespace, in its own session (a terminal's Ctrl-C is ours to
    handle), its output in a log file; this process's environment unless one is given."""

    def __init__(
        self,
        host: netns.Host,
        command: Sequence[str],
        log_path: Path,
        environment: Mapping[str, str] | None = None,
        user: str | None = None,
        cwd: Path = REPOSITORY,
    ) -> None:
        self.host = host
        as_user = ["runuser", "-u", user, "--"] if user else []
        full = netns.in_namespace(host.namespace, [*as_user, *command])
        variables = dict(os.environ if environment is None else environment)
        super().__init__(full, variables, log_path, cwd=cwd)

    def stop(self, grace_s: float = 20.0) -> None:
        super().stop(grace_s)


def wait_until(what: str, ready: Callable[[], bool], process: HostProcess | None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if process is not None and process.exit_code() is not None:
            raise HarnessError(f"{what} exited: {process.log_tail(600)}")
        if time.monotonic() > deadline:
            raise HarnessError(f"{what} did not answer within {START_TIMEOUT_S:g} s")
        time.sleep(0.1)


class PrivatePostgres:
    """A throwaway PostgreSQL 15 cluster of the suite's own on the db host (``initdb`` as the
    postgres user: the server refuses to run as root). Default server settings, except
    durability (fsync off: the cluster is thrown away) and where it listens."""

    def __init__(self, host: netns.Host, folder: Path) -> None:
        self.host = host
        self.folder = folder
        self.data = folder / "pgdata"
        self.process: HostProcess | None = None

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://{PG_USER}@{self.host.address}:{PG_PORT}/{database}"

    def start(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise HarnessError(f"{PG_BIN / 'initdb'} is missing (Debian: postgresql-15)")
        self.folder.mkdir()
        shutil.chown(self.folder, PG_USER, PG_USER)
        result = subprocess.run(
            [
                "runuser", "-u", PG_USER, "--", str(PG_BIN / "initdb"), "-D", str(self.data),
                "--auth=trust", f"--username={PG_USER}", "--encoding=UTF8",
                "--locale=C.UTF-8", "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        if result.returncode != 0:
            raise HarnessError(f"initdb failed: {result.stderr.strip()[-500:]}")
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {netns.SUBNET}.0/{netns.PREFIX_LENGTH} trust\n")
        command = [
            str(PG_BIN / "postgres"), "-D", str(self.data),
            "-c", f"listen_addresses={self.host.address}", "-c", f"port={PG_PORT}",
            "-c", f"unix_socket_directories={self.folder}",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=200",
        ]  # fmt: skip
        self.process = HostProcess(
            self.host, command, self.folder / "postgres.log", user=PG_USER, cwd=self.folder
        )
        wait_until("PostgreSQL", self._answers, self.process)

    def _answers(self) -> bool:
        try:
            psycopg2.connect(self._dsn("postgres"), connect_timeout=1).close()
        except psycopg2.OperationalError:
            return False
        return True

    def _dsn(self, database: str) -> str:
        return f"host={self.host.address} port={PG_PORT} user={PG_USER} dbname={database}"

    def create_database(self, name: str, options: str) -> str:
        """A new database (``options`` appended to CREATE DATABASE), migrated; its URL."""
        connection = psycopg2.connect(self._dsn("postgres"), connect_timeout=5)
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}" {options}')
        finally:
            connection.close()
        url = self.admin_url(name)
        schema.upgrade(url)
        return url

    def connect(self, database: str) -> Any:
        """A psycopg2 connection of the suite's own (the locks it takes, its probes)."""
        return psycopg2.connect(
            self._dsn(database), connect_timeout=5, application_name="chaos-partition"
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()  # thrown away: nothing to shut down cleanly


class PrivateRedis:
    """A ``redis-server`` of the suite's own on the db host, without persistence."""

    def __init__(self, host: netns.Host, folder: Path) -> None:
        self.host = host
        self.folder = folder
        self.process: HostProcess | None = None
        self.url = f"redis://{host.address}:{REDIS_PORT}/0"

    def start(self) -> None:
        command = [
            "redis-server", "--bind", self.host.address, "--port", str(REDIS_PORT),
            "--save", "", "--appendonly", "no", "--protected-mode", "no",
            "--daemonize", "no", "--dir", str(self.folder),
        ]  # fmt: skip
        self.process = HostProcess(self.host, command, self.folder / "redis.log")
        wait_until("redis-server", self._answers, self.process)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=5)

    def _answers(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def queue_length(self, queue: str) -> int:
        return redis_queue_length(self.client(), queue)

    def unacked_task_ids(self) -> set[str]:
        """The task ids of the messages delivered to a consumer and not acknowledged yet."""
        client = self.client()
        try:
            values = client.hvals(UNACKED_KEY)
        finally:
            client.close()
        ids = set()
        for value in values:
            with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
                ids.add(str(json.loads(value)[0]["headers"]["id"]))
        return ids

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()


class RemoteFake:
    """The fake microservice on its host, driven through its admin API (``/_admin``)."""

    def __init__(self, host: netns.Host, folder: Path, variables: Mapping[str, str]) -> None:
        self.url = f"http://{host.address}:{MICRO_PORT}"
        command = [
            str(processes.STOCK_SYNC), "fake-microservice",
            "--host", host.address, "--port", str(MICRO_PORT),
        ]  # fmt: skip
        environment = process_environment(variables)
        self.process = HostProcess(host, command, folder / "fake-microservice.log", environment)
        wait_until("the fake microservice", self._answers, self.process)

    def _request(self, method: str, path: str, payload: object = None) -> Any:
        body = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(
            self.url + path, data=body, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    def _answers(self) -> bool:
        try:
            self._request("GET", "/_admin/health")
        except (OSError, urllib.error.URLError):
            return False
        return True

    def add_orders(self, orders: Sequence[Mapping[str, Any]]) -> None:
        for start in range(0, len(orders), 200):
            self._request("POST", "/_admin/orders", {"orders": list(orders[start : start + 200])})

    def order(self, order_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self._request("GET", f"/_admin/orders/{order_id}")
        return found

    def fulfillment_requests(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._request("GET", "/_admin/fulfillments")["fulfillments"]
        return found

    def stop(self) -> None:
        self.process.stop(5)


def publish_orders(fake: RemoteFake, scenario: Scenario) -> None:
    bodies = []
    for order in scenario.orders:
        knobs = {name: value for name, value in order.knobs.items() if name not in DROPPED_KNOBS}
        bodies.append({**order.body(), **knobs})
    fake.add_orders(bodies)


# --- the Celery fleet -------------------------------------------------------------------------


class Fleet:
    """A worker on each of w1, w2, w3 and beat on its host. A process that exits on its own is
    restarted (as a supervisor's restart policy would) and noted for the report."""

    def __init__(
        self,
        hosts: Mapping[str, netns.Host],
        variables: Mapping[str, Mapping[str, str]],
        logs: Path,
        run_id: str,
    ) -> None:
        self._hosts = hosts
        self._variables = variables
        self._logs = logs
        self._lock = threading.Lock()
        self._processes: dict[str, HostProcess] = {}
        self.node_names = {worker: f"{worker}@{netns.PREFIX}-{run_id}" for worker in WORKERS}
        self.unexpected_exits: list[str] = []

    def log_paths(self) -> list[Path]:
        return sorted(self._logs.glob("*.log"))

    def _start(self, role: str) -> None:
        if role == BEAT:
            arguments = ["beat", "--loglevel", "WARNING"]
        else:
            arguments = tool_worker_arguments(
                WORKER_POOLS[role], CONCURRENCY, self.node_names[role]
            )
        environment = process_environment(self._variables[role])
        command = processes.celery_command(arguments)
        self._processes[role] = HostProcess(
            self._hosts[role], command, self._logs / f"{role}.log", environment
        )

    def start(self) -> None:
        with self._lock:
            for role in (*WORKERS, BEAT):
                self._start(role)
        for worker in WORKERS:
            node = self.node_names[worker]
            wait_until(f"worker {worker}", functools.partial(ping, node), self._processes[worker])

    def revive_exited(self) -> None:
        with self._lock:
            for role, process in list(self._processes.items()):
                code = process.exit_code()
                if code is not None:
                    last = process.log_tail(300).strip().splitlines()[-1:] or [""]
                    self.unexpected_exits.append(f"{role} exited with {code}: {last[0][:200]}")
                    self._start(role)

    def stop(self) -> None:
        with self._lock:
            processes, self._processes = list(self._processes.values()), {}
        threads = [threading.Thread(target=process.stop) for process in processes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def ping(node: str, timeout_s: float = 1.0) -> bool:
    """Whether the worker ``node`` answers a ping through the broker."""
    return bool(_app().control.ping(destination=[node], timeout=timeout_s))


def tasks_done(node: str) -> int | None:
    """How many tasks the worker ``node`` has received in all (``inspect stats``), None when it
    does not answer."""
    replies = _app().control.inspect(destination=[node], timeout=1.0, limit=1).stats() or {}
    stats = replies.get(node)
    if not stats:
        return None
    return sum(int(count) for count in stats.get("total", {}).values())


def held_task_ids(node: str) -> set[str]:
    """The tasks the worker ``node`` says it holds unacknowledged: running (not acknowledged
    yet: ``task_acks_late``), reserved, and waiting for their ETA (a retry's countdown)."""
    inspector = _app().control.inspect(destination=[node], timeout=1.0, limit=1)
    held: set[str] = set()
    for requests in (inspector.active() or {}).values():
        held |= {str(r["id"]) for r in requests if not r.get("acknowledged")}
    for requests in (inspector.reserved() or {}).values():
        held |= {str(r["id"]) for r in requests}
    for entries in (inspector.scheduled() or {}).values():
        held |= {str(entry["request"]["id"]) for entry in entries}
    return held


# --- the partitions ---------------------------------------------------------------------------


@dataclass
class Partition:
    """One fault of the run: when it began (seconds into the partition phase), what the suite
    checked when it did, how many frames the switch dropped for it."""

    name: str
    description: str
    began_s: float
    detail: str = ""
    dropped_frames: int = 0
    lasted_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "began_s": round(self.began_s, 1),
            "lasted_s": round(self.lasted_s, 1),
            "dropped_frames": self.dropped_frames,
            "detail": self.detail,
        }


@dataclass
class HealReport:
    healed_at: float | None = None  # monotonic
    back_s: dict[str, float] = field(default_factory=dict)  # worker -> seconds to work again
    not_back: list[str] = field(default_factory=list)

    @property
    def heal_s(self) -> float:
        return max(self.back_s.values(), default=0.0)


_DB_VICTIM_SQL = """
select pid from pg_stat_activity
where client_addr = %(address)s and wait_event_type = 'Lock'
  and %(holder)s = any(pg_blocking_pids(pid))
limit 1
"""
_BACKEND_SQL = "select state, xact_start from pg_stat_activity where pid = %(pid)s"


class Partitioner(Agent):
    """Begins the four partitions ``gap_s`` apart once ``PARTITIONS_FROM`` of the orders are
    submitted, heals them all ``hold_s`` after the last began, then waits for every worker to
    work again. Always heals, also when stopped early."""

    POLL_S = 0.2

    def __init__(
        self,
        stop: threading.Event,
        rig: Rig,
        options: Options,
        submitted_fraction: Callable[[], float],
    ) -> None:
        super().__init__("partitioner", stop)
        self._rig = rig
        self._options = options
        self._submitted_fraction = submitted_fraction
        self.partitions: list[Partition] = []
        self.heal = HealReport()
        self.orphan_s = 0.0  # how long w2's cut-off transaction stayed open on the server
        self._phase_started = 0.0
        self._orphan: tuple[int, Any] | None = None  # (backend pid, its xact_start)
        self._orphan_since = 0.0

    def loop(self) -> None:
        while self._submitted_fraction() < PARTITIONS_FROM:
            if self.pause(self.POLL_S):
                return
        self._phase_started = time.monotonic()
        steps = (self._cut_database, self._cut_microservice, self._cut_broker, self._slow_link)
        try:
            for index, step in enumerate(steps):
                if self._wait(self._phase_started + index * self._options.gap_s):
                    return
                step()
                say(f"    partition {self.partitions[-1].name}: {self.partitions[-1].detail}")
            self._wait(time.monotonic() + self._options.hold_s)
        finally:
            self._heal_all()
        self._watch_heal()

    def _wait(self, until: float) -> bool:
        """Until ``until``, watching the orphaned transaction; True when stopped."""
        while time.monotonic() < until:
            self._watch_orphan()
            if self.pause(min(self.POLL_S, max(until - time.monotonic(), 0))):
                return True
        return False

    def _began(self, name: str, description: str, detail: str) -> None:
        elapsed = time.monotonic() - self._phase_started
        self.partitions.append(Partition(name, description, elapsed, detail))

    # 1. w2 from the database, inside a transaction

    def _cut_database(self) -> None:
        rig = self._rig
        w2, db = rig.net.hosts[W2], rig.net.hosts[DB]
        deadline = time.monotonic() + FORCE_TIMEOUT_S
        holder = rig.postgres.connect(DATABASE_NAME)
        probe = rig.postgres.connect(DATABASE_NAME)
        probe.autocommit = True
        try:
            while time.monotonic() < deadline and not self.stop_event.is_set():
                victim = self._catch_in_transaction(holder, probe, w2.address)
                if victim is None:
                    continue
                rig.net.cut("w2_database", [w2], [db], PG_PORT)
                holder.rollback()  # the rows go: w2's statement runs, its answer is dropped
                state = self._backend_state(probe, victim)
                if state is None or state[1] is None:
                    rig.net.heal("w2_database")  # it was not inside a transaction: again
                    continue
                self._orphan, self._orphan_since = (victim, state[1]), time.monotonic()
                self._began(
                    "w2_database",
                    "w2 cut off from PostgreSQL in the middle of a deduction",
                    f"w2's backend {victim} was blocked in a transaction behind the suite's row "
                    f"locks when the link was cut; then {state[0]!r}, transaction open",
                )
                return
        finally:
            holder.close()
            probe.close()
        raise HarnessError(
            f"no deduction of w2 was caught in a transaction in {FORCE_TIMEOUT_S:g} s"
        )

    def _catch_in_transaction(self, holder: Any, probe: Any, address: str) -> int | None:
        """Hold every free stock row for up to ``LOCK_WINDOW_S``; the pid of a backend of
        ``address`` blocked behind them, else None (the rows are let go)."""
        with holder.cursor() as cursor:
            cursor.execute("select pg_backend_pid()")
            holder_pid = cursor.fetchone()[0]
            cursor.execute("select sku from stock_levels order by sku for update skip locked")
        window = time.monotonic() + LOCK_WINDOW_S
        while time.monotonic() < window:
            with probe.cursor() as cursor:
                cursor.execute(_DB_VICTIM_SQL, {"address": address, "holder": holder_pid})
                row = cursor.fetchone()
            if row is not None:
                return int(row[0])
            time.sleep(0.02)
        holder.rollback()
        time.sleep(0.3)  # let the queue behind the rows drain before trying again
        return None

    @staticmethod
    def _backend_state(probe: Any, pid: int) -> tuple[str, Any] | None:
        time.sleep(0.5)  # the server has run the statement and sent its answer by now
        with probe.cursor() as cursor:
            cursor.execute(_BACKEND_SQL, {"pid": pid})
            row = cursor.fetchone()
        return None if row is None else (str(row[0]), row[1])

    def _watch_orphan(self) -> None:
        """Note how long w2's transaction stays open on the server after the cut."""
        if self._orphan is None:
            return
        pid, xact_start = self._orphan
        try:
            probe = self._rig.postgres.connect(DATABASE_NAME)
        except psycopg2.Error:
            return
        try:
            probe.autocommit = True
            with probe.cursor() as cursor:
                cursor.execute(_BACKEND_SQL, {"pid": pid})
                row = cursor.fetchone()
        finally:
            probe.close()
        if row is None or row[1] != xact_start:
            self._orphan = None
        self.orphan_s = time.monotonic() - self._orphan_since

    # 2. the microservice from every worker

    def _cut_microservice(self) -> None:
        hosts = self._rig.net.hosts
        self._rig.net.cut("microservice", [hosts[w] for w in WORKERS], [hosts[MICRO]], None)
        self._began(
            "microservice",
            "the microservice cut off from every worker",
            "w1, w2, w3 <-> micro: every frame dropped; the shop still reaches it",
        )

    # 3. w1 from the broker, holding unacknowledged messages

    def _cut_broker(self) -> None:
        rig = self._rig
        w1, db = rig.net.hosts[W1], rig.net.hosts[DB]
        node = rig.fleet.node_names[W1]
        deadline = time.monotonic() + FORCE_TIMEOUT_S
        while time.monotonic() < deadline and not self.stop_event.is_set():
            self._watch_orphan()
            held = held_task_ids(node) & rig.redis.unacked_task_ids()
            if not held:
                time.sleep(0.2)
                continue
            rig.net.cut("w1_broker", [w1], [db], REDIS_PORT)
            still = held & rig.redis.unacked_task_ids()
            if not still:
                rig.net.heal("w1_broker")  # acknowledged in between: again
                continue
            self._began(
                "w1_broker",
                "w1 cut off from the broker holding unacknowledged messages",
                f"w1 held {len(still)} unacknowledged message(s) at the cut (named by inspect, "
                f"found in the broker's {UNACKED_KEY!r} hash before and after the cut)",
            )
            return
        raise HarnessError(
            f"w1 was not seen holding an unacknowledged message in {FORCE_TIMEOUT_S:g} s"
        )

    # 4. w3's link slowed

    def _slow_link(self) -> None:
        self._rig.net.wires[W3].set(SLOW_LINK_DELAY_S, SLOW_LINK_LOSS)
        self._began(
            "w3_slow_link",
            f"w3's link: {SLOW_LINK_DELAY_S * 1000:.0f} ms delay and {SLOW_LINK_LOSS:.0%} "
            "loss each way",
            "every frame to and from w3 delayed, some lost",
        )

    # healing

    def _heal_all(self) -> None:
        net = self._rig.net
        now = time.monotonic()
        for partition in self.partitions:
            partition.lasted_s = now - self._phase_started - partition.began_s
            if partition.name in net.cuts:
                with contextlib.suppress(netns.NetworkError):
                    partition.dropped_frames = net.dropped(partition.name)
        for name in net.cuts:
            net.heal(name)
        wire = net.wires[W3]
        if wire.alive():
            wire.set(0.0, 0.0)
        self.heal.healed_at = time.monotonic()
        say(f"    healed {len(self.partitions)} partition(s)")

    def _watch_heal(self) -> None:
        """Until every worker answers through the broker and receives work again (or nothing
        is left to do), or ``HEAL_TIMEOUT_S``."""
        healed_at = self.heal.healed_at or time.monotonic()
        first_count: dict[str, int] = {}
        waiting = set(WORKERS)
        while waiting and time.monotonic() - healed_at < HEAL_TIMEOUT_S:
            self._watch_orphan()
            idle = chaos_checks.read_progress(self._rig.database).calm
            for worker in sorted(waiting):
                count = tasks_done(self._rig.fleet.node_names[worker])
                if count is None:
                    continue
                first_count.setdefault(worker, count)
                if count > first_count[worker] or idle:
                    self.heal.back_s[worker] = time.monotonic() - healed_at
                    waiting.discard(worker)
            if waiting and self.stop_event.wait(0.5):
                break
        self.heal.not_back = sorted(waiting)
        self._watch_orphan()


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Rig:
    net: netns.Network
    scenario: Scenario
    postgres: PrivatePostgres
    redis: PrivateRedis
    fake: RemoteFake
    database: Database
    fleet: Fleet
    variables: dict[str, str]  # the shop's
    tally: ProducerTally = field(default_factory=ProducerTally)


@dataclass
class PartitionReport(SuiteReport):
    SUITE: ClassVar[str] = "chaos-partition"

    options: Options
    partitions: list[Partition]
    heal: HealReport
    orphan_s: float
    settle_s: float

    def figures(self) -> dict[str, Any]:
        return {
            "orders": self.options.orders,
            "operations": sum(self.statuses.values()),
            "completed": self.statuses.get(OperationStatus.COMPLETED.value, 0),
            "cancelled": self.statuses.get(OperationStatus.CANCELLED.value, 0),
            "failed": self.statuses.get(OperationStatus.FAILED.value, 0),
            "partitions": len(self.partitions),
            "dropped_frames": sum(p.dropped_frames for p in self.partitions),
            "longest_cut_s": round(max((p.lasted_s for p in self.partitions), default=0), 1),
            "orphan_txn_s": round(self.orphan_s, 1),
            "heal_s": round(self.heal.heal_s, 1),
            "settle_s": round(self.settle_s, 1),
            "process_exits": len(self.process_exits),
            "lost_answers": self.lost_answers,
            "cancels": self.tally.cancels,
            "total_s": round(self.total_s, 1),
        }

    def details(self) -> dict[str, Any]:
        return {
            "partition_details": [partition.to_dict() for partition in self.partitions],
            "workers_back_s": {k: round(v, 1) for k, v in self.heal.back_s.items()},
            "workers_not_back": self.heal.not_back,
            "submits": self.tally.submits,
            "enqueue_failed": self.tally.enqueue_failed,
        }


def host_variables(
    base: Mapping[str, str], host: str, workdir: Path, database_options: str
) -> dict[str, str]:
    """A host's STOCK_SYNC_* variables: its own data folder, its connections named after it
    (``application_name``), and the experiment's connection options when given."""
    data_dir = workdir / "hosts" / host
    data_dir.mkdir(parents=True, exist_ok=True)
    url = with_application_name(base[f"{ENV_PREFIX}DATABASE_URL"], f"stock-sync-{host}")
    if database_options:
        parsed = make_url(url)
        extra = dict(pair.split("=", 1) for pair in database_options.split("&") if "=" in pair)
        url = parsed.update_query_dict(extra).render_as_string(hide_password=False)
    return {
        **base,
        f"{ENV_PREFIX}DATA_DIR": str(data_dir),
        f"{ENV_PREFIX}DATABASE_URL": url,
    }


def build_network(stack: contextlib.ExitStack, run_id: str, logs: Path) -> netns.Network:
    net = stack.enter_context(netns.network(run_id))
    for name, number in HOST_NUMBERS.items():
        net.add_host(name, number, wire=name == W3)
    net.wires[W3].start(logs / "wire-w3.log")
    return net


def start_rig(stack: contextlib.ExitStack, options: Options, run_id: str, workdir: Path) -> Rig:
    logs = workdir / "logs"
    logs.mkdir()
    net = build_network(stack, run_id, logs)
    netns.enter_namespace(net.hosts[SHOP].namespace)  # from here on, this process is the shop
    hosts = net.hosts
    postgres = PrivatePostgres(hosts[DB], workdir / "db")
    stack.callback(postgres.stop)
    postgres.start()
    database_url = postgres.create_database(DATABASE_NAME, ICU_EN_US)
    broker = PrivateRedis(hosts[DB], workdir)
    stack.callback(broker.stop)
    broker.start()
    scenario = build_scenario(options.orders, options.seed, run_id)
    queue = f"stock-sync-partition-{run_id}"
    microservice_url = f"http://{hosts[MICRO].address}:{MICRO_PORT}"
    base = run_environment(
        database_url, broker.url, microservice_url, queue, workdir, task_events="off"
    )
    base.update({f"{ENV_PREFIX}{name}": value for name, value in PARTITION_SETTINGS.items()})
    base[f"{ENV_PREFIX}RETRY_BACKOFF_MAX_S"] = f"{options.backoff_max_s:g}"
    variables = {
        host: host_variables(
            base, host, workdir, options.database_options if host in WORKERS else ""
        )
        for host in HOST_NUMBERS
    }
    fake = RemoteFake(hosts[MICRO], logs, variables[MICRO])
    stack.callback(fake.stop)
    publish_orders(fake, scenario)
    configure_this_process(variables[SHOP])
    database = Database(variables[SHOP][f"{ENV_PREFIX}DATABASE_URL"])
    stack.callback(database.dispose)
    stock_skus(database, dict(scenario.initial_stock))
    fleet = Fleet(hosts, variables, logs, run_id)
    stack.callback(fleet.stop)
    fleet.start()
    say(
        f"    hosts: {', '.join(f'{h.name} {h.address}' for h in hosts.values())}; "
        f"PostgreSQL and redis-server on {hosts[DB].address}; logs in {logs}"
    )
    return Rig(net, scenario, postgres, broker, fake, database, fleet, variables[SHOP])


class Keeper(Agent):
    """Restarts any Celery process that exited on its own, for the whole run."""

    def __init__(self, stop: threading.Event, fleet: Fleet) -> None:
        super().__init__("keeper", stop)
        self._fleet = fleet

    def loop(self) -> None:
        while not self.pause(0.5):
            self._fleet.revive_exited()


def check_agents(agents: Sequence[Agent]) -> None:
    errors = agent_errors(agents)
    if errors:
        raise HarnessError("an agent of the suite crashed:\n" + "\n".join(errors))


def run_partition_phase(rig: Rig, options: Options, keeper: Keeper) -> Partitioner:
    """Orders submitted and cancelled while the partitions begin and heal; returns when every
    order was submitted and the heal was watched."""
    submit_stop, faults_stop = threading.Event(), threading.Event()
    queue = rig.variables[f"{ENV_PREFIX}QUEUE_NAME"]
    submitter = Submitter(
        submit_stop,
        rig.scenario.orders,
        1 / options.rate,
        lambda: rig.redis.queue_length(queue),
        MAX_BACKLOG,
        rig.tally,
    )
    operator = Operator(
        faults_stop, rig.database, lambda: submitter.submitted_orders, CANCEL_SHARE, rig.tally
    )
    partitioner = Partitioner(faults_stop, rig, options, submitter.submitted_fraction)
    agents: list[Agent] = [submitter, operator, partitioner]
    for agent in agents:
        agent.start()
    started = time.monotonic()
    next_line = PROGRESS_EVERY_S
    try:
        while submitter.is_alive() or partitioner.is_alive():
            time.sleep(0.5)
            check_agents([*agents, keeper])
            if time.monotonic() - started >= next_line:
                next_line += PROGRESS_EVERY_S
                progress = chaos_checks.read_progress(rig.database)
                say(
                    f"    {time.monotonic() - started:.0f} s: submitted "
                    f"{submitter.submitted_orders}/{len(rig.scenario.orders)}, "
                    f"{progress.deductions_finished}/{progress.deductions} finished, "
                    f"partitions {len(partitioner.partitions)}, cuts now {rig.net.cuts}"
                )
        time.sleep(TAIL_S)
    finally:
        stop_agents(faults_stop, [partitioner, operator], timeout_s=60)
        stop_agents(submit_stop, [submitter], timeout_s=120)
    check_agents([*agents, keeper])
    return partitioner


def workers_back(heal: HealReport) -> Assertion:
    check = Assertion(
        "workers_back_after_heal",
        f"every worker answered through the broker and took work again within "
        f"{HEAL_TIMEOUT_S:g} s of the heal",
    )
    for worker in heal.not_back:
        check.violated(f"{worker} did not come back")
    return check


def judge(rig: Rig, snapshot: Snapshot, heal: HealReport) -> list[Assertion]:
    shared = chaos_verdict.shared_assertions(
        snapshot, rig.database, rig.scenario, RETRY_BUDGETS, rig.variables,
        rig.fleet.log_paths(), rig.tally.errors,
        "submit_operation raised nothing but EnqueueFailed and request_cancellation "
        "nothing but a refusal of a FAILED operation",
    )  # fmt: skip
    return [*shared, workers_back(heal)]


def show_violations(rig: Rig, assertions: Sequence[Assertion]) -> None:
    for assertion in assertions:
        if assertion.ok:
            continue
        say(f"\nVIOLATED {assertion.name}: {assertion.description}")
        say(f"  {len(assertion.found)} violations, for example:")
        for example in assertion.examples()[:5]:
            say(f"  - {example.message}")
        for operation_id in assertion.example_operations(2):
            with rig.database.transaction() as session:
                details = operation_details(session, operation_id)
            say(render.operation(shortened_timeline(details)))


def save_evidence(rig: Rig, assertions: Sequence[Assertion], folder: Path) -> None:
    chaos_verdict.save_operations_and_logs(rig.database, assertions, rig.fleet.log_paths(), folder)


@contextlib.contextmanager
def registered_run() -> Iterator[tuple[str, Path]]:
    """A run id, registered as alive, and its temporary folder; both gone on exit."""
    run_id = netns.new_run_id()
    netns.register_run(run_id)
    try:
        workdir = Path(tempfile.mkdtemp(prefix=f"{netns.TEMP_PREFIX}{run_id}-"))
        workdir.chmod(0o711)  # the postgres user reaches its folder inside
        yield run_id, workdir
    finally:
        netns.remove_run(run_id)


def run(options: Options) -> PartitionReport:
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        run_id, workdir = stack.enter_context(registered_run())
        say(f"[1/4] setting up run {run_id}: {options.orders} orders, seed {options.seed}")
        rig = start_rig(stack, options, run_id, workdir)
        keeper_stop = threading.Event()
        keeper = Keeper(keeper_stop, rig.fleet)
        stack.callback(stop_agents, keeper_stop, [keeper])
        keeper.start()
        say(
            f"[2/4] partitions: orders at most {options.rate:g}/s; four partitions "
            f"{options.gap_s:g} s apart, healed {options.hold_s:g} s after the last began"
        )
        partitioner = run_partition_phase(rig, options, keeper)
        healed_at = partitioner.heal.healed_at or time.monotonic()
        say(
            f"    every worker back {partitioner.heal.heal_s:.1f} s after the heal"
            + (f"; NOT back: {partitioner.heal.not_back}" if partitioner.heal.not_back else "")
        )
        say(f"[3/4] settling (at most {options.settle_timeout_s:.0f} s)")
        calm = chaos_checks.wait_for_calm(
            rig.database, options.settle_timeout_s, on_poll=lambda: check_agents([keeper])
        )
        settle_s = time.monotonic() - healed_at
        stop_agents(keeper_stop, [keeper])
        rig.fleet.stop()
        reset_databases()
        rig.database.dispose()
        say("[4/4] judging")
        snapshot = chaos_verdict.take_snapshot(rig.database, rig.scenario, rig.fake)
        assertions = judge(rig, snapshot, partitioner.heal)
        show_violations(rig, assertions)
        if options.evidence_dir is not None:
            save_evidence(rig, assertions, options.evidence_dir)
        result = PartitionReport(
            options=options,
            partitions=partitioner.partitions,
            heal=partitioner.heal,
            orphan_s=partitioner.orphan_s,
            calm=calm,
            settle_s=settle_s,
            process_exits=rig.fleet.unexpected_exits,
            lost_answers=chaos_checks.lost_answers(snapshot.puts),
            tally=rig.tally,
            statuses=status_counts(snapshot),
            errors_by_type=chaos_checks.errors_by_type(rig.database),
            assertions=assertions,
            total_s=time.monotonic() - started,
        )
    return result


# --- command line -----------------------------------------------------------------------------


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = cli_args.suite_parser(
        "python -m stock_sync_dev.chaos_partition",
        "Run stock-sync on separate hosts (network namespaces), cut the links "
        "between them while orders flow, heal them, then check its invariants.",
        DEFAULT_ORDERS,
        DEFAULT_SEED,
    )
    _add_partition_arguments(parser)
    args = parser.parse_args(argv)
    if args.gap < 0:
        parser.error(f"--gap must be >= 0, got {args.gap}")
    settle_timeout_s = (
        args.settle_timeout or SETTLE_TIMEOUT_BASE_S + args.orders * SETTLE_TIMEOUT_PER_ORDER_S
    )
    return cli_args.options_of(
        Options,
        args,
        gap_s=args.gap,
        hold_s=args.hold,
        backoff_max_s=args.backoff_max,
        settle_timeout_s=settle_timeout_s,
    )


def _add_partition_arguments(parser: argparse.ArgumentParser) -> None:
    """The partitions' pace, the run's retry backoff and settling, and the experiment."""
    parser.add_argument(
        "--rate",
        type=cli_args.positive_seconds,
        default=SUBMITS_PER_S,
        help="orders a second, at most",
    )
    parser.add_argument(
        "--gap", type=float, default=GAP_S, help=f"seconds between partitions (default {GAP_S:g})"
    )
    parser.add_argument(
        "--hold",
        type=cli_args.positive_seconds,
        default=HOLD_S,
        help=f"seconds from the last partition to the heal (default {HOLD_S:g})",
    )
    parser.add_argument(
        "--backoff-max",
        type=cli_args.positive_seconds,
        default=float(PARTITION_SETTINGS["RETRY_BACKOFF_MAX_S"]),
        help="STOCK_SYNC_RETRY_BACKOFF_MAX_S of the run",
    )
    parser.add_argument(
        "--settle-timeout",
        type=cli_args.positive_seconds,
        default=None,
        help=f"seconds to wait for calm after the heal (default {SETTLE_TIMEOUT_BASE_S:g} + "
        f"{SETTLE_TIMEOUT_PER_ORDER_S:g} per order)",
    )
    parser.add_argument(
        "--database-options",
        default="",
        help="an experiment: libpq connection parameters added to the workers' database URL, "
        "as NAME=VALUE pairs joined by '&', values as they are (spaces allowed), e.g. "
        "'keepalives_idle=5&options=-c idle_in_transaction_session_timeout=10000'",
    )
    parser.add_argument("--evidence-dir", type=Path, default=None)


def report(result: PartitionReport) -> None:
    say("")
    for partition in result.partitions:
        say(
            f"  {partition.name:<16} began {partition.began_s:5.1f} s, lasted "
            f"{partition.lasted_s:5.1f} s, {partition.dropped_frames} frames dropped: "
            f"{partition.detail}"
        )
    back = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(result.heal.back_s.items()))
    say(f"  workers working again after the heal: {back or 'none'}")
    chaos_verdict.say_assertions(result.assertions)
    chaos_verdict.say_errors(result.errors_by_type)
    for exit_line in result.process_exits[:5]:
        say(f"  process exit: {exit_line}")
    chaos_verdict.print_result(result)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    signal.signal(signal.SIGTERM, cli_args.interrupt_on_sigterm)
    signal.signal(signal.SIGHUP, cli_args.interrupt_on_sigterm)
    try:
        for removed in netns.sweep_leftovers():
            say(f"removed a leftover of a run that died: {removed}")
        problem = netns.can_make_namespaces()
        if problem is not None:
            say(f"chaos-partition: cannot create network namespaces here: {problem}")
            return EXIT_HARNESS_FAILED
        result = run(options)
    except KeyboardInterrupt:
        say("interrupted; everything the partition suite made was removed")
        return EXIT_INTERRUPTED
    except (HarnessError, netns.NetworkError) as error:
        say(f"chaos-partition: the harness failed: {error}")
        return EXIT_HARNESS_FAILED
    except Exception:
        say(traceback.format_exc())
        say("chaos-partition: the harness failed (the traceback above)")
        return EXIT_HARNESS_FAILED
    report(result)
    return EXIT_OK if result.ok else EXIT_VIOLATED


if __name__ == "__main__":
    sys.exit(main())

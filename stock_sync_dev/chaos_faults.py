"""The fault injectors of ``python -m stock_sync_dev.chaos``: a private broker that is crashed
and restarted (a Redis server, or RabbitMQ stopped and started), Celery processes that are
SIGKILLed, and the background threads ("agents") that submit orders twice at once, cancel
operations at every stage, hold stock rows in slow transactions and release held PUTs.

Every agent runs in a daemon thread until its stop event is set; an exception that escapes an
agent is a fault of the harness, not of the product, and is kept for the run to report.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis
from sqlalchemy import func, select

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import PendingStockOperation, StockLevel
from stock_sync.domain.errors import CancellationRefused, EnqueueFailed
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.producer import request_cancellation, submit_operation
from stock_sync_dev import rabbitmq
from stock_sync_dev.bench.harness import CeleryProcess, tool_worker_arguments
from stock_sync_dev.chaos_scenario import PlannedOrder
from stock_sync_dev.processes import ChildProcess
from stock_sync_fake import FakeMicroservice

S = OperationStatus
REDIS_START_TIMEOUT_S = 10.0
DEFAULT_REDIS_PORT = 6379
OPERATOR = "chaos-operator"
# The statuses the operator cancels from, in turn: every stage of the pipeline gets cancels.
CANCEL_FROM = (S.PENDING, S.PROCESSING, S.STOCK_DEDUCTED, S.COMPLETED)


class HarnessError(Exception):
    """The harness could not do its job (a server would not start, an agent crashed)."""


# --- the broker ---------------------------------------------------------------------------------


class ChaosBroker(Protocol):
    """A broker the run may crash: started (again, at the same address) by ``start``."""

    @property
    def url(self) -> str: ...

    def describe(self) -> str: ...

    def start(self) -> None: ...

    def crash(self) -> None: ...

    def queue_length(self, queue: str) -> int: ...

    def stop(self) -> None: ...


# --- Redis ------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on now, never Redis's default (someone else's Redis)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port != DEFAULT_REDIS_PORT:
            return port


def redis_queue_length(client: redis.Redis, queue: str) -> int:
    """Messages waiting in ``queue``, 0 while the server is down (nothing is waiting); the
    client is closed."""
    try:
        return int(client.llen(queue))
    except redis.RedisError:
        return 0
    finally:
        client.close()


class ChaosRedis:
    """A private ``redis-server`` without persistence: a crash loses every queued message."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self._folder = folder
        self._process: subprocess.Popen[bytes] | None = None
        self.crashes = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def describe(self) -> str:
        return f"redis-server on port {self.port}"

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(self._folder),
        ]  # fmt: skip
        # its own session: a terminal's Ctrl-C is ours to handle, not Redis's
        log_path = self._folder / "redis.log"
        self._process = ChildProcess(command, dict(os.environ), log_path, cwd=Path.cwd()).process
        self._wait_until_answering()

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            while True:
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        return
                if self._process is not None and self._process.poll() is not None:
                    raise HarnessError(f"redis-server exited; see {self._folder / 'redis.log'}")
                if time.monotonic() > deadline:
                    raise HarnessError(f"redis-server on port {self.port} did not answer")
                time.sleep(0.05)
        finally:
            client.close()

    def queue_length(self, queue: str) -> int:
        """Messages waiting in ``queue``; 0 while the server is down (nothing is waiting)."""
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=1)
        return redis_queue_length(client, queue)

    def crash(self) -> None:
        """Stop without saving, alternately by ``SHUTDOWN NOSAVE`` and by SIGKILL."""
        process = self._process
        if process is None:
            return
        self.crashes += 1
        if self.crashes % 2:
            client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
            with contextlib.suppress(redis.RedisError):
                client.shutdown(nosave=True)  # the server closes the connection: no reply
            client.close()
        else:
            process.send_signal(signal.SIGKILL)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        self._process = None

    def stop(self) -> None:
        """Gone for good (SIGKILL: nothing of it is worth saving)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(5)

    def __enter__(self) -> ChaosRedis:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


# --- RabbitMQ ---------------------------------------------------------------------------------


class ChaosRabbit:
    """RabbitMQ in a virtual host of the run's own, crashed by stopping the RabbitMQ application
    of its node (``rabbitmqctl stop_app``: every connection is cut) and started again
    (``start_app``). Unlike the Redis above it keeps what was queued: the queues are quorum
    queues, on disk.

    The node is one of its own (:class:`rabbitmq.PrivateNode`) unless ``node`` names a running
    one (the machine's ``rabbit@localhost``, reached at ``amqp_url``); stopping that one stops
    it for everyone using it, and a ``start_app`` that fails leaves it down.
    """

    def __init__(self, tag: str, node: str | None = None, amqp_url: str = "") -> None:
        self._private = None if node else rabbitmq.PrivateNode(f"chaos-{tag}")
        self._node = node or self._private.name  # type: ignore[union-attr]
        self.vhost = f"stock-sync-chaos-{tag}"
        self._amqp_url = amqp_url
        self._started = False
        self._connection: Any = None
        self.crashes = 0

    @property
    def url(self) -> str:
        if self._private is not None:
            return self._private.url(self.vhost)
        return f"{self._amqp_url.rstrip('/')}/{self.vhost}"

    def describe(self) -> str:
        where = "its own node" if self._private is not None else "the node"
        return f"RabbitMQ on {where} {self._node}, virtual host {self.vhost}"

    def start(self) -> None:
        """Boot (the first time) or start the application again after a crash."""
        try:
            if self._started:
                rabbitmq.rabbitmqctl("start_app", node=self._node)
                rabbitmq.rabbitmqctl("await_startup", "--timeout", "60", node=self._node)
                return
            if self._private is not None:
                self._private.start()
            rabbitmq.add_vhost(self.vhost, node=self._node)
            self._started = True
        except rabbitmq.RabbitMQError as error:
            raise HarnessError(str(error)) from None

    def crash(self) -> None:
        self.crashes += 1
        self._forget_connection()
        try:
            rabbitmq.rabbitmqctl("stop_app", node=self._node)
        except rabbitmq.RabbitMQError as error:
            raise HarnessError(str(error)) from None

    def queue_length(self, queue: str) -> int:
        """Messages ready in ``queue``; 0 while the broker is down or the queue not declared."""
        from kombu.connection import Connection

        connect: Any = Connection  # kombu is untyped
        try:
            if self._connection is None:
                self._connection = connect(self.url, connect_timeout=1)
                self._connection.ensure_connection(max_retries=0)
            channel = self._connection.default_channel
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except Exception:
            self._forget_connection()
            return 0

    def _forget_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.release()

    def stop(self) -> None:
        """The node of its own halted and removed; on a shared node the virtual host deleted."""
        self._forget_connection()
        if self._private is not None:
            self._private.stop()
        elif self._started:
            with contextlib.suppress(rabbitmq.RabbitMQError):
                rabbitmq.delete_vhost(self.vhost, node=self._node)
        self._started = False

    def __enter__(self) -> ChaosRabbit:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


# --- Celery processes -------------------------------------------------------------------------

VICTIM, STEADY, BEAT = "worker-killed", "worker-steady", "beat"


def _arguments(role: str, generation: int) -> list[str]:
    if role == BEAT:
        return ["beat", "--loglevel", "WARNING"]
    # The victim is a prefork worker (its children die with it), the steady one uses threads.
    pool = "prefork" if role == VICTIM else "threads"
    hostname = f"chaos-{role}-{generation}-{uuid.uuid4().hex[:6]}@%h"
    return tool_worker_arguments(pool, 2, hostname)


class Fleet:
    """The run's Celery processes: a worker that gets SIGKILLed, a steady worker and beat.

    A process that exits without being killed (a worker can die of a broker restart inside
    kombu) is restarted too, as a supervisor would, and noted for the report.
    """

    def __init__(self, variables: dict[str, str], logs: Path) -> None:
        self._variables = variables
        self._logs = logs
        self._lock = threading.Lock()
        self._processes: dict[str, CeleryProcess] = {}
        self._generations: Counter[str] = Counter()
        self.kills = 0
        self.unexpected_exits: list[str] = []

    def log_paths(self) -> list[Path]:
        return sorted(self._logs.glob("*.log"))

    def start(self) -> None:
        with self._lock:
            for role in (VICTIM, STEADY, BEAT):
                self._start(role)

    def _start(self, role: str) -> None:
        self._generations[role] += 1
        arguments = _arguments(role, self._generations[role])
        log_path = self._logs / f"{role}.log"  # appended to by every generation
        self._processes[role] = CeleryProcess(arguments, self._variables, log_path)

    def kill_victim(self) -> None:
        """SIGKILL the victim's process group (mid-task, most likely) and start a new one."""
        with self._lock:
            self._processes[VICTIM].kill()
            self.kills += 1
            self._start(VICTIM)

    def revive_exited(self) -> None:
        """Restart any process that exited on its own, noting its exit code and last line."""
        with self._lock:
            for role, process in list(self._processes.items()):
                code = process.exit_code()
                if code is None:
                    continue
                self.unexpected_exits.append(f"{role} exited with {code}: {_last_words(process)}")
                self._start(role)

    def stop(self) -> None:
        with self._lock:
            processes, self._processes = list(self._processes.values()), {}
        for process in processes:
            process.stop()


def _last_words(process: CeleryProcess) -> str:
    """The message of the last CRITICAL or ERROR record of a JSON log, else its last line."""
    lines = process.log_tail(200_000).splitlines()
    for line in reversed(lines):
        if '"level": "CRITICAL"' in line or '"level": "ERROR"' in line:
            with contextlib.suppress(ValueError):
                return str(json.loads(line).get("message", ""))[:300]
    return (lines or [""])[-1][:300]


# --- agents -----------------------------------------------------------------------------------


class Agent(threading.Thread):
    """A daemon thread that runs ``loop`` until ``stop`` is set; keeps what escaped it."""

    def __init__(self, name: str, stop: threading.Event) -> None:
        super().__init__(name=f"chaos-{name}", daemon=True)
        self.stop_event = stop
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.loop()
        except Exception:
            self.error = traceback.format_exc()

    def loop(self) -> None:
        raise NotImplementedError

    def pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless stopped first; True when it is time to stop."""
        return self.stop_event.wait(max(seconds, 0.0))


class FleetKeeper(Agent):
    """Kills the victim worker every few seconds while ``killing`` is set, and restarts any
    process of the fleet that exited on its own (during the whole run)."""

    POLL_S = 0.5

    def __init__(
        self,
        stop: threading.Event,
        fleet: Fleet,
        rng: random.Random,
        kill_every_s: tuple[float, float],
    ) -> None:
        super().__init__("fleet-keeper", stop)
        self.fleet = fleet
        self.killing = threading.Event()
        self._rng = rng
        self._kill_every_s = kill_every_s

    def loop(self) -> None:
        next_kill = time.monotonic() + self._rng.uniform(*self._kill_every_s)
        while not self.pause(self.POLL_S):
            self.fleet.revive_exited()
            if self.killing.is_set() and time.monotonic() >= next_kill:
                self.fleet.kill_victim()
                next_kill = time.monotonic() + self._rng.uniform(*self._kill_every_s)


class BrokerCrasher(Agent):
    """Crashes the private broker each time the submissions pass one of ``at_fractions`` (of
    all orders) and restarts it at the same address after ``down_s``: on Redis every queued
    and unacknowledged message is lost, on RabbitMQ every connection."""

    POLL_S = 0.2

    def __init__(
        self,
        stop: threading.Event,
        broker: ChaosBroker,
        submitted_fraction: Callable[[], float],
        at_fractions: Sequence[float],
        down_s: float,
    ) -> None:
        super().__init__("broker-crasher", stop)
        self._broker = broker
        self._submitted_fraction = submitted_fraction
        self._at_fractions = sorted(at_fractions)
        self._down_s = down_s
        self.restarts = 0

    def loop(self) -> None:
        for fraction in self._at_fractions:
            while self._submitted_fraction() < fraction:
                if self.pause(self.POLL_S):
                    return
            self._broker.crash()
            time.sleep(self._down_s)  # not interruptible: the broker must come back up
            self._broker.start()
            self.restarts += 1


@dataclass
class ProducerTally:
    """What the producer side saw; ``errors`` are the calls that failed unexpectedly."""

    submits: int = 0
    enqueue_failed: int = 0
    cancels: int = 0
    cancels_from: Counter[str] = field(default_factory=Counter)
    cancels_refused: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def unexpected(self, what: str, error: BaseException) -> None:
        with self.lock:
            detail = " ".join(str(error).split())[:300]  # one line, however long the error
            self.errors.append(f"{what}: {type(error).__name__}: {detail}")


class Submitter(Agent):
    """Submits every order, one every ``interval_s`` at most, slower when the broker's queue
    is long. Each submit runs in a thread of its own; a raced order's threads are released
    together by a barrier, each submitting with its own account name (None or the shop's)."""

    MAX_IN_FLIGHT = 12  # submits block for seconds while the broker is down: bound them
    BACKLOG_POLL_S = 0.1

    def __init__(
        self,
        stop: threading.Event,
        orders: Sequence[PlannedOrder],
        interval_s: float,
        backlog: Callable[[], int],
        max_backlog: int,
        tally: ProducerTally,
    ) -> None:
        super().__init__("submitter", stop)
        self._orders = orders
        self._interval_s = interval_s
        self._backlog = backlog
        self._max_backlog = max_backlog
        self._tally = tally
        self._in_flight = threading.BoundedSemaphore(self.MAX_IN_FLIGHT)
        self._threads: list[threading.Thread] = []
        self.submitted_orders = 0

    def submitted_fraction(self) -> float:
        return self.submitted_orders / max(len(self._orders), 1)

    def loop(self) -> None:
        try:
            for index, order in enumerate(self._orders):
                if self.pause(self._interval_s) or self._wait_for_the_workers():
                    return
                self._launch(order)
                self.submitted_orders = index + 1
        finally:
            for thread in self._threads:
                thread.join()

    def _wait_for_the_workers(self) -> bool:
        """Hold back while the queue is long: a message waiting longer than the stuck delay
        would be re-driven by the sweep, adding work that makes the queue longer still.
        True when it is time to stop."""
        while self._backlog() > self._max_backlog:
            if self.pause(self.BACKLOG_POLL_S):
                return True
        return False

    def _launch(self, order: PlannedOrder) -> None:
        barrier = threading.Barrier(len(order.submit_accounts))
        for account in order.submit_accounts:
            self._in_flight.acquire()
            thread = threading.Thread(
                target=self._submit,
                args=(order.order_id, account, barrier),
                name=f"chaos-submit-{order.order_id}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        self._threads = [thread for thread in self._threads if thread.is_alive()]

    def _submit(self, order_id: str, account: str | None, barrier: threading.Barrier) -> None:
        try:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=5)  # the racers start together
            submit_operation(order_id, account)
        except EnqueueFailed:
            # The row is saved; the broker is down (a crash of ours): the sweep re-drives it.
            with self._tally.lock:
                self._tally.enqueue_failed += 1
        except Exception as error:
            self._tally.unexpected(f"submit_operation({order_id!r}, {account!r})", error)
        finally:
            with self._tally.lock:
                self._tally.submits += 1
            self._in_flight.release()


def _random_operation_in(database: Database, status: OperationStatus) -> uuid.UUID | None:
    op = PendingStockOperation
    with database.transaction() as session:
        return session.scalar(
            select(op.id)
            .where(
                op.operation_type == OperationType.ORDER_DEDUCTION.value,
                op.status == status.value,
            )
            .order_by(func.random())
            .limit(1)
        )


class Operator(Agent):
    """Cancels random operations, about ``share`` of the orders submitted so far, taking the
    statuses of ``CANCEL_FROM`` in turn so cancels land at every stage (a stage with nothing
    in it passes its turn on)."""

    POLL_S = 0.25

    def __init__(
        self,
        stop: threading.Event,
        database: Database,
        submitted_orders: Callable[[], int],
        share: float,
        tally: ProducerTally,
    ) -> None:
        super().__init__("operator", stop)
        self._database = database
        self._submitted_orders = submitted_orders
        self._share = share
        self._tally = tally
        self._turn = 0

    def loop(self) -> None:
        while not self.pause(self.POLL_S):
            attempted = self._tally.cancels + self._tally.cancels_refused
            if attempted < self._share * self._submitted_orders():
                self._cancel_one()

    def _cancel_one(self) -> None:
        for attempt in range(len(CANCEL_FROM)):
            status = CANCEL_FROM[(self._turn + attempt) % len(CANCEL_FROM)]
            operation_id = _random_operation_in(self._database, status)
            if operation_id is not None:
                self._cancel(operation_id)
                break
        self._turn += 1

    def _cancel(self, operation_id: uuid.UUID) -> None:
        try:
            result = request_cancellation(operation_id, OPERATOR, "chaos: cancelled at random")
        except CancellationRefused:
            # It reached FAILED between our SELECT and the cancel: FAILED is final.
            with self._tally.lock:
                self._tally.cancels_refused += 1
            return
        except Exception as error:
            self._tally.unexpected(f"request_cancellation({operation_id})", error)
            return
        with self._tally.lock:
            self._tally.cancels += 1
            self._tally.cancels_from[result.cancelled_from.value] += 1


class StockCounter(Agent):
    """Now and then holds the lock of one hot stock row for a moment, changing nothing, as a
    stock count or a slow report would. Stock transactions queue behind it; code that takes
    stock locks in two different orders then deadlocks where it would otherwise only rarely
    meet."""

    def __init__(
        self,
        stop: threading.Event,
        database: Database,
        skus: Sequence[str],
        rng: random.Random,
        every_s: float,
        hold_s: tuple[float, float],
    ) -> None:
        super().__init__("stock-counter", stop)
        self._database = database
        self._skus = skus
        self._rng = rng
        self._every_s = every_s
        self._hold_s = hold_s
        self.counts = 0

    def loop(self) -> None:
        while not self.pause(self._every_s):
            with self._database.transaction() as session:
                session.execute(
                    select(StockLevel.quantity)
                    .where(StockLevel.sku == self._rng.choice(self._skus))
                    .with_for_update()
                )
                time.sleep(self._rng.uniform(*self._hold_s))
            self.counts += 1


class HeldPutReleaser(Agent):
    """Opens the gate of a ``hold_puts`` order ``hold_s`` after a PUT first waits at it, so
    the PUT lands after its sender timed out (and maybe after a cancel)."""

    POLL_S = 0.2

    def __init__(
        self, stop: threading.Event, fake: FakeMicroservice, order_ids: Sequence[str], hold_s: float
    ) -> None:
        super().__init__("put-releaser", stop)
        self._fake = fake
        self._waiting = set(order_ids)
        self._hold_s = hold_s
        self._first_held: dict[str, float] = {}

    def loop(self) -> None:
        while not self.pause(self.POLL_S):
            now = time.monotonic()
            for order_id in sorted(self._waiting):
                if self._fake.held_puts(order_id):
                    self._first_held.setdefault(order_id, now)
                if now - self._first_held.get(order_id, now) >= self._hold_s:
                    self._release(order_id)

    def _release(self, order_id: str) -> None:
        self._fake.release_puts(order_id)
        self._waiting.discard(order_id)

    def release_all(self) -> None:
        """Open every gate left (the run is calming down); call once the thread has ended."""
        for order_id in sorted(self._waiting):
            self._release(order_id)


def stop_agents(stop: threading.Event, agents: Sequence[Agent], timeout_s: float = 30.0) -> None:
    stop.set()
    for agent in agents:
        agent.join(timeout_s)


def agent_errors(agents: Sequence[Agent]) -> list[str]:
    return [f"{agent.name}: {agent.error}" for agent in agents if agent.error]

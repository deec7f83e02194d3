"""``python -m stock_sync_dev.chaos [--orders N] [--seed S] [--json]`` (``make chaos``): the
fault suite. Thousands of orders go through real Celery processes while everything that can go
wrong does, all at once; then the faults stop, the run calms down and the invariants of
DESIGN.md are checked.

The faults, during the fault phase:

- the broker: a private ``redis-server`` (its own port, no persistence) is crashed without
  saving (``SHUTDOWN NOSAVE`` or SIGKILL) and restarted on the same port, once per 1,000
  orders and at least once: every queued message is lost and the beat sweep must re-drive the
  stuck operations; with ``--broker rabbitmq``, RabbitMQ (quorum queues, a virtual host of
  the run's own on a node of its own, or on ``--rabbitmq-node``) is stopped and started
  instead (``rabbitmqctl stop_app`` / ``start_app``): every connection is cut, the queues
  keep their messages;
- the workers: of two real ``celery worker`` processes (prefork and threads, 2 each), one is
  SIGKILLed with its children every few seconds and restarted; ``celery beat`` sweeps every
  second for operations idle for 3 s;
- the microservice (the fake, over HTTP in this process): 5xx, 429 with a short Retry-After,
  requests that stall past the client's timeout, PUTs applied but answered after it, and per
  order: late payment, sync PUTs answered 502 or dropped after taking effect, PUTs held at a
  gate that land late;
- the shop: orders submitted from two or three threads at once (without and with the account
  name); an operator thread cancelling random operations at every stage (PENDING, PROCESSING,
  STOCK_DEDUCTED, COMPLETED);
- the database: a slow transaction (a stock count) holding a best seller's stock row for a
  moment, now and then, so stock transactions queue as they do under load.

Orders are submitted at most 14 a second and held back while the broker's queue is long, so
the run adapts to the machine; the fault phase lasts until every order was submitted.

The stock (see ``chaos_scenario``) lets most orders complete, makes some run short and a few
ask for far more than exists: those end FAILED once their validation budget is spent.

After the fault phase the faults stop (no kills, no crashes, fake faults off, held PUTs
released), the processes keep running, and the run waits until every order deduction and every
microservice rollback is terminal. The Celery processes are then stopped and the assertions of
``chaos_checks`` judge what is left; each violated one is reported by name with examples and
timelines. One summary line ends the run (``--json``: the same as JSON on stdout).

Exit codes: 0 every assertion holds; 1 an assertion is violated; 2 the harness itself failed;
130 interrupted. Everything started is stopped and removed, also on failure and Ctrl-C: the
processes, the Redis server, the throwaway database (created with an ICU en-US collation, as a
production database typically is) and the temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from stock_sync.adapters.db import Database, reset_databases
from stock_sync.adapters.settings import ENV_PREFIX
from stock_sync.domain.statuses import OperationStatus
from stock_sync.entrypoints import render
from stock_sync.services.queries import operation_details
from stock_sync_dev import chaos_verdict, cli_args
from stock_sync_dev.bench.harness import (
    configure_this_process,
    run_environment,
    say,
    stock_skus,
    throwaway_database,
)
from stock_sync_dev.chaos_checks import (
    Assertion,
    Calm,
    Snapshot,
    errors_by_type,
    lost_answers,
    read_progress,
    wait_for_calm,
)
from stock_sync_dev.chaos_faults import (
    Agent,
    BrokerCrasher,
    ChaosBroker,
    ChaosRabbit,
    ChaosRedis,
    Fleet,
    FleetKeeper,
    HarnessError,
    HeldPutReleaser,
    Operator,
    ProducerTally,
    StockCounter,
    Submitter,
    agent_errors,
    stop_agents,
)
from stock_sync_dev.chaos_scenario import BUNDLE, Scenario, build_scenario
from stock_sync_dev.chaos_verdict import SuiteReport
from stock_sync_fake import FakeMicroservice

S = OperationStatus
DEFAULT_ORDERS = 2000
DEFAULT_SEED = 1
BROKERS = ("redis", "rabbitmq")
# Where --rabbitmq-node's AMQP listener is (user, password, host, port; no virtual host).
RABBITMQ_URL = os.environ.get("STOCK_SYNC_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")

# Pace: at most this many orders a second, and none while the broker's queue holds more
# than MAX_BACKLOG messages, so this mode stays a storm of faults while the orders flow (a
# backlog of any age is the backlog mode's subject: chaos_time).
SUBMITS_PER_S = 14.0
MAX_BACKLOG = 30
MIN_FAULT_S = 25.0
FAULT_TAIL_S = 5.0  # faults go on this long after the last submit
KILL_EVERY_S = (5.0, 9.0)
ORDERS_PER_BROKER_CRASH = 1000
BROKER_DOWN_S = 2.0
CANCEL_SHARE = 0.1  # about this share of the orders gets a cancel from the operator
HOLD_PUTS_S = 2.5  # longer than the client's timeout: the held PUT lands after it gave up
# A slow transaction holding a best seller's stock row now and then (a stock count).
STOCK_COUNT_EVERY_S = 0.5
STOCK_COUNT_HOLD_S = (0.1, 0.3)
FAULT_PROGRESS_EVERY_S = 10.0
# Generous: the slowest operations are the ones spending a whole retry budget.
SETTLE_TIMEOUT_BASE_S = 120.0
SETTLE_TIMEOUT_PER_ORDER_S = 0.06

# A case-insensitive collation: "apple-1" sorts before "Zebra-1" in SQL, after it in Python.
ICU_EN_US = "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
COLLATIONS = {"en-US": ICU_EN_US, "server": ""}

# Moderate rates, a few % each, so most orders complete; timeouts above the client's 1 s. The
# fake is strict (Allegro's semantics): buyers edit and cancel orders after they were read,
# and PUTs are held longer than the client waits, applied after it gave up.
FAULTS: dict[str, Any] = {
    "error_rate": 0.03,
    "rate_limit_rate": 0.03,
    "retry_after_s": 0.2,
    "timeout_rate": 0.02,
    "timeout_s": 1.5,
    "late_answer_rate": 0.04,
    "late_answer_s": 1.5,
    "buyer_edit_rate": 0.04,
    "buyer_cancel_rate": 0.01,
    "hold_rate": 0.03,
    "hold_s": 1.5,
}
NO_FAULTS = {
    "error_rate": 0.0,
    "rate_limit_rate": 0.0,
    "timeout_rate": 0.0,
    "late_answer_rate": 0.0,
    "buyer_edit_rate": 0.0,
    "buyer_cancel_rate": 0.0,
    "hold_rate": 0.0,
}

# Short backoffs and generous budgets so that what can settle settles within the run.
CHAOS_SETTINGS = {
    "MICROSERVICE_TIMEOUT_S": "1",
    "RETRY_BACKOFF_BASE_S": "0.05",
    "RETRY_BACKOFF_MAX_S": "1",
    # Distinct budgets, so an operation failing on another stage's budget shows.
    "MAX_RETRIES_PENDING": "15",
    "MAX_RETRIES_PROCESSING": "16",
    "MAX_RETRIES_DEDUCTION": "18",
    "MAX_RETRIES_STOCK_DEDUCTED": "20",
    "MAX_RETRIES_ROLLBACK": "25",
    # A dead attempt is found after STUCK_AFTER_S, which must exceed the hard time limit plus
    # the microservice deadline (so a running attempt is never taken for a dead one); a lost
    # message once a probe sent after it came through TASK_TIME_LIMIT_S ago.
    "MICROSERVICE_DEADLINE_S": "2",
    "TASK_SOFT_TIME_LIMIT_S": "4",
    "TASK_TIME_LIMIT_S": "5",
    "SWEEP_INTERVAL_S": "1",
    "STUCK_AFTER_S": "8",
    "RETRY_RELEASE_INTERVAL_S": "1",
    "ALERT_INTERVAL_S": "3600",
}
RETRY_BUDGETS = chaos_verdict.retry_budgets(CHAOS_SETTINGS)


@dataclass(frozen=True)
class Options:
    orders: int
    seed: int
    json_output: bool
    fault_s: float
    settle_timeout_s: float
    collation: str
    admin_url: str
    evidence_dir: Path | None
    broker: str = "redis"
    rabbitmq_node: str | None = None  # None: a node of its own


@dataclass
class Rig:
    """What the phases share: the servers and processes of the run and its bookkeeping."""

    scenario: Scenario
    broker: ChaosBroker
    fake: FakeMicroservice
    database: Database
    fleet: Fleet
    variables: dict[str, str]
    tally: ProducerTally = field(default_factory=ProducerTally)


@dataclass
class ChaosReport(SuiteReport):
    """What a run did and what it found."""

    SUITE: ClassVar[str] = "chaos"

    options: Options
    kills: int
    broker_restarts: int
    buyer_edits: int
    buyer_cancels: int
    late_puts: int
    fault_s: float

    def figures(self) -> dict[str, Any]:
        """The summary's figures, in the order the line shows them."""
        return {
            "broker": self.options.broker,
            "orders": self.options.orders,
            "operations": sum(self.statuses.values()),
            "completed": self.statuses.get(S.COMPLETED.value, 0),
            "cancelled": self.statuses.get(S.CANCELLED.value, 0),
            "failed": self.statuses.get(S.FAILED.value, 0),
            "kills": self.kills,
            "process_exits": len(self.process_exits),
            "broker_restarts": self.broker_restarts,
            "lost_answers": self.lost_answers,
            "buyer_edits": self.buyer_edits,
            "buyer_cancels": self.buyer_cancels,
            "late_puts": self.late_puts,
            "cancels": self.tally.cancels,
            "enqueue_failed": self.tally.enqueue_failed,
            "fault_s": round(self.fault_s, 1),
            "settle_s": round(self.calm.seconds, 1),
            "total_s": round(self.total_s, 1),
        }

    def details(self) -> dict[str, Any]:
        return {
            "submits": self.tally.submits,
            "cancels_from": dict(self.tally.cancels_from),
            "cancels_refused": self.tally.cancels_refused,
        }


# --- setting up -------------------------------------------------------------------------------


def chaos_variables(
    database_url: str, broker_url: str, microservice_url: str, queue: str, data_dir: Path
) -> dict[str, str]:
    """The STOCK_SYNC_* variables of every process of the run."""
    variables = run_environment(
        database_url, broker_url, microservice_url, queue, data_dir, task_events="off"
    )
    variables.update({f"{ENV_PREFIX}{name}": value for name, value in CHAOS_SETTINGS.items()})
    return variables


def publish_orders(fake: FakeMicroservice, scenario: Scenario) -> None:
    for order in scenario.orders:
        fake.add_order(order.body(), **order.knobs)


# --- the fault phase --------------------------------------------------------------------------


def broker_crash_points(options: Options) -> list[float]:
    """Shares of the submissions at which the broker crashes: evenly spread, at least one,
    one per 1,000 orders."""
    crashes = max(1, options.orders // ORDERS_PER_BROKER_CRASH)
    return [(index + 1) / (crashes + 1) for index in range(crashes)]


def check_agents(agents: Sequence[Agent]) -> None:
    errors = agent_errors(agents)
    if errors:
        raise HarnessError("a fault injector crashed:\n" + "\n".join(errors))


def run_fault_phase(rig: Rig, options: Options, keeper: FleetKeeper) -> BrokerCrasher:
    """Every fault at once until every order was submitted (and at least ``fault_s``); then
    the faults stop and the fleet keeps running. Returns the crasher for its restart count."""
    faults_stop, submit_stop = threading.Event(), threading.Event()
    queue = rig.variables[f"{ENV_PREFIX}QUEUE_NAME"]
    submitter = Submitter(
        submit_stop,
        rig.scenario.orders,
        1 / SUBMITS_PER_S,
        lambda: rig.broker.queue_length(queue),
        MAX_BACKLOG,
        rig.tally,
    )
    crasher = BrokerCrasher(
        faults_stop,
        rig.broker,
        submitter.submitted_fraction,
        broker_crash_points(options),
        BROKER_DOWN_S,
    )
    held = [order.order_id for order in rig.scenario.orders if order.held]
    releaser = HeldPutReleaser(faults_stop, rig.fake, held, HOLD_PUTS_S)
    operator = Operator(
        faults_stop, rig.database, lambda: submitter.submitted_orders, CANCEL_SHARE, rig.tally
    )
    counter = StockCounter(
        faults_stop,
        rig.database,
        BUNDLE,
        random.Random(options.seed),
        STOCK_COUNT_EVERY_S,
        STOCK_COUNT_HOLD_S,
    )
    agents: list[Agent] = [crasher, releaser, operator, counter, submitter]
    rig.fake.set_faults(**FAULTS)
    keeper.killing.set()
    for agent in agents:
        agent.start()
    try:
        _watch_fault_phase(rig, options, agents, submitter, crasher)
    finally:
        keeper.killing.clear()
        stop_agents(submit_stop, [submitter], timeout_s=120)
        stop_agents(faults_stop, [crasher, releaser, operator, counter])
        rig.fake.set_faults(**NO_FAULTS)
        releaser.release_all()
    check_agents([*agents, keeper])
    return crasher


def _watch_fault_phase(
    rig: Rig,
    options: Options,
    agents: Sequence[Agent],
    submitter: Submitter,
    crasher: BrokerCrasher,
) -> None:
    """Progress lines until the phase is over: everything submitted, the broker crashes
    done, ``FAULT_TAIL_S`` more for the last orders, and at least ``fault_s`` in all."""
    started = time.monotonic()
    next_line = FAULT_PROGRESS_EVERY_S
    submitted_at: float | None = None
    while True:
        time.sleep(0.5)
        check_agents(agents)
        now = time.monotonic()
        if submitted_at is None and not submitter.is_alive() and not crasher.is_alive():
            submitted_at = now
        if submitted_at is not None and now >= max(
            submitted_at + FAULT_TAIL_S, started + options.fault_s
        ):
            return
        if now - started >= next_line:
            next_line += FAULT_PROGRESS_EVERY_S
            say(_fault_line(rig, now - started, submitter, crasher))


def _fault_line(rig: Rig, elapsed: float, submitter: Submitter, crasher: BrokerCrasher) -> str:
    progress = read_progress(rig.database)
    return (
        f"    fault phase {elapsed:.0f} s: submitted "
        f"{submitter.submitted_orders}/{len(rig.scenario.orders)} orders, "
        f"{progress.deductions_finished}/{progress.deductions} operations finished, "
        f"kills {rig.fleet.kills}, broker restarts {crasher.restarts}, "
        f"cancels {rig.tally.cancels}"
    )


# --- calm, then judgement ---------------------------------------------------------------------


def settle(rig: Rig, options: Options, keeper: FleetKeeper) -> Calm:
    """Wait, processes running and faults off, until every operation is terminal."""
    say(f"[3/4] calm: faults off, waiting (at most {options.settle_timeout_s:.0f} s)")
    calm = wait_for_calm(
        rig.database, options.settle_timeout_s, on_poll=lambda: check_agents([keeper])
    )
    if not calm.reached:
        say(f"    calm NOT reached after {calm.seconds:.0f} s: judging the state as it is")
    return calm


def stop_everything_moving(rig: Rig, keeper: FleetKeeper, keeper_stop: threading.Event) -> None:
    """Stop the keeper and the Celery processes, and close this process's connections: a
    PostgreSQL session reports its deadlock count when it ends."""
    stop_agents(keeper_stop, [keeper])
    rig.fleet.stop()
    reset_databases()
    rig.database.dispose()


def take_snapshot(rig: Rig) -> Snapshot:
    return chaos_verdict.take_snapshot(rig.database, rig.scenario, rig.fake)


def judge(rig: Rig, snapshot: Snapshot) -> list[Assertion]:
    """Every assertion of the suite, in the order the report lists them."""
    return chaos_verdict.shared_assertions(
        snapshot, rig.database, rig.scenario, RETRY_BUDGETS, rig.variables,
        rig.fleet.log_paths(), rig.tally.errors,
        "submit_operation raised nothing but EnqueueFailed (broker down) and "
        "request_cancellation nothing but a refusal of a FAILED operation",
    )  # fmt: skip


def status_counts(snapshot: Snapshot) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in snapshot.deductions():
        counts[row.status] = counts.get(row.status, 0) + 1
    return counts


# --- evidence ---------------------------------------------------------------------------------

TIMELINES_PER_ASSERTION = 2
TIMELINE_HEAD, TIMELINE_TAIL = 12, 16
EXAMPLES_SHOWN = 5


def show_violations(rig: Rig, assertions: Sequence[Assertion]) -> None:
    """Each violated assertion with examples and the timelines of its first operations."""
    for assertion in assertions:
        if assertion.ok:
            continue
        say(f"\nVIOLATED {assertion.name}: {assertion.description}")
        duplicated = assertion.on_duplicated_orders
        note = f" ({duplicated} on orders with several deduction operations)" if duplicated else ""
        say(f"  {len(assertion.found)} violations{note}, for example:")
        for example in assertion.examples()[:EXAMPLES_SHOWN]:
            say(f"  - {example.message}")
        for operation_id in assertion.example_operations(TIMELINES_PER_ASSERTION):
            with rig.database.transaction() as session:
                details = operation_details(session, operation_id)
            say(render.operation(shortened_timeline(details)))


def shortened_timeline(details: dict[str, Any]) -> dict[str, Any]:
    """The details with a long timeline cut in the middle (retries repeat themselves)."""
    events = details["events"]
    if len(events) <= TIMELINE_HEAD + TIMELINE_TAIL:
        return details
    omitted = len(events) - TIMELINE_HEAD - TIMELINE_TAIL
    gap: dict[str, Any] = {
        "action": f"... {omitted} events omitted ...",
        "from_status": None,
        "to_status": None,
        "at": None,
        "details": {},
    }
    return {**details, "events": [*events[:TIMELINE_HEAD], gap, *events[-TIMELINE_TAIL:]]}


def save_evidence(rig: Rig, assertions: Sequence[Assertion], folder: Path) -> None:
    """``stock-sync show --json`` of every example operation, the fake's PUTs and the logs."""
    folder.mkdir(parents=True, exist_ok=True)
    puts = rig.fake.fulfillment_requests()
    (folder / "fulfillments.json").write_text(json.dumps(puts, indent=2))
    chaos_verdict.save_operations_and_logs(rig.database, assertions, rig.fleet.log_paths(), folder)


# --- the run ----------------------------------------------------------------------------------


def start_rig(
    stack: contextlib.ExitStack,
    options: Options,
    workdir: Path,
    *,
    scenario: Scenario | None = None,
    start_fleet: bool = True,
) -> Rig:
    """The servers and processes of a run, each stopped and removed when ``stack`` closes
    (the Celery processes started now, or by the caller with ``rig.fleet.start()``)."""
    tag = uuid.uuid4().hex[:8]
    scenario = scenario or build_scenario(options.orders, options.seed, tag)
    broker = chaos_broker(options, tag, workdir)
    stack.enter_context(broker)  # started now, stopped (and removed) with the stack
    database_url = stack.enter_context(
        throwaway_database(
            options.admin_url,
            prefix="stock_sync_chaos",
            create_options=COLLATIONS[options.collation],
        )
    )
    fake = stack.enter_context(FakeMicroservice(seed=options.seed))
    publish_orders(fake, scenario)
    variables = chaos_variables(
        database_url, broker.url, fake.url, f"stock-sync-chaos-{tag}", workdir
    )
    configure_this_process(variables)
    database = Database(database_url)
    stack.callback(database.dispose)
    stock_skus(database, dict(scenario.initial_stock))
    logs = workdir / "logs"
    logs.mkdir()
    fleet = Fleet(variables, logs)
    stack.callback(fleet.stop)
    if start_fleet:
        fleet.start()
    say(
        f"    {broker.describe()}, fake microservice {fake.url}, "
        f"{len(scenario.initial_stock)} SKUs, logs in {logs}"
    )
    return Rig(scenario, broker, fake, database, fleet, variables)


def remove_unless_kept(workdir: Path, clean_verdict: threading.Event) -> None:
    """Remove the run's folder after a clean verdict; otherwise keep it and say where."""
    if clean_verdict.is_set():
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        say(f"the run's logs are kept in {workdir / 'logs'}")


def chaos_broker(options: Options, tag: str, workdir: Path) -> ChaosRedis | ChaosRabbit:
    if options.broker == "rabbitmq":
        return ChaosRabbit(tag, node=options.rabbitmq_node, amqp_url=RABBITMQ_URL)
    return ChaosRedis(workdir)


def run(options: Options) -> ChaosReport:
    """One run, with everything it started stopped and removed before returning or raising."""
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="stock-sync-chaos-"))
        # The logs are the evidence of a failed run: removed only once the verdict is clean.
        clean_verdict = threading.Event()
        stack.callback(remove_unless_kept, workdir, clean_verdict)
        say(f"[1/4] setting up: {options.orders} orders, seed {options.seed}")
        rig = start_rig(stack, options, workdir)
        keeper_stop = threading.Event()
        keeper = FleetKeeper(keeper_stop, rig.fleet, random.Random(options.seed), KILL_EVERY_S)
        stack.callback(stop_agents, keeper_stop, [keeper])
        keeper.start()
        say(f"[2/4] fault phase: at most {SUBMITS_PER_S:g} orders a second")
        fault_started = time.monotonic()
        crasher = run_fault_phase(rig, options, keeper)
        fault_s = time.monotonic() - fault_started
        calm = settle(rig, options, keeper)
        stop_everything_moving(rig, keeper, keeper_stop)
        say("[4/4] judging")
        snapshot = take_snapshot(rig)
        assertions = judge(rig, snapshot)
        show_violations(rig, assertions)
        if all(assertion.ok for assertion in assertions):
            clean_verdict.set()
        if options.evidence_dir is not None:
            save_evidence(rig, assertions, options.evidence_dir)
        result = ChaosReport(
            options=options,
            calm=calm,
            kills=rig.fleet.kills,
            process_exits=rig.fleet.unexpected_exits,
            broker_restarts=crasher.restarts,
            lost_answers=lost_answers(snapshot.puts),
            buyer_edits=sum(e["kind"] == "edit" for e in rig.fake.buyer_events()),
            buyer_cancels=sum(e["kind"] == "cancel" for e in rig.fake.buyer_events()),
            late_puts=sum(bool(put.get("held")) for put in snapshot.puts),
            tally=rig.tally,
            statuses=status_counts(snapshot),
            errors_by_type=errors_by_type(rig.database),
            assertions=assertions,
            fault_s=fault_s,
            total_s=time.monotonic() - started,
        )
    return result


# --- command line -----------------------------------------------------------------------------


def default_settle_timeout_s(orders: int) -> float:
    return SETTLE_TIMEOUT_BASE_S + orders * SETTLE_TIMEOUT_PER_ORDER_S


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = cli_args.suite_parser(
        "python -m stock_sync_dev.chaos",
        "Run stock-sync under broker crashes, worker kills, microservice faults, "
        "racing submits and random cancels; then check its invariants.",
        DEFAULT_ORDERS,
        DEFAULT_SEED,
    )
    _add_run_arguments(parser)
    args = parser.parse_args(argv)
    return cli_args.options_of(
        Options,
        args,
        fault_s=args.fault_seconds or MIN_FAULT_S,
        settle_timeout_s=args.settle_timeout or default_settle_timeout_s(args.orders),
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """How long the faults and the settling last, and what the run stands on."""
    parser.add_argument(
        "--fault-seconds",
        type=float,
        default=None,
        help="the shortest fault phase; it lasts until every order was submitted "
        f"(at most {SUBMITS_PER_S:g} a second, slower when the workers fall behind) and "
        f"{FAULT_TAIL_S:g} s more (default {MIN_FAULT_S:g})",
    )
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=None,
        help="seconds to wait for calm after the faults stopped (default: "
        f"{SETTLE_TIMEOUT_BASE_S:g} + {SETTLE_TIMEOUT_PER_ORDER_S:g} per order)",
    )
    parser.add_argument(
        "--collation",
        choices=sorted(COLLATIONS),
        default="en-US",
        help="the throwaway database's collation: ICU en-US (default) or the server's",
    )
    cli_args.add_postgres_url(parser)
    parser.add_argument(
        "--broker",
        choices=BROKERS,
        default="redis",
        help="the broker crashed mid-run: a private redis-server (default), or RabbitMQ",
    )
    parser.add_argument(
        "--rabbitmq-node",
        default=None,
        help="with --broker rabbitmq: run on this running node (e.g. rabbit@localhost, at "
        "STOCK_SYNC_TEST_RABBITMQ_URL) instead of a node of its own; it is stopped and "
        "started like one",
    )
    parser.add_argument(
        "--evidence-dir",
        type=Path,
        default=None,
        help="save the example operations' timelines, the fake's PUTs and the logs here",
    )


def report(result: ChaosReport) -> None:
    """The assertion table on stderr, then the summary line (or the JSON) on stdout."""
    say("")
    chaos_verdict.say_assertions(result.assertions)
    cancels = ", ".join(f"{k}={v}" for k, v in sorted(result.tally.cancels_from.items()))
    say(
        f"  cancels by stage: {cancels or 'none'}; refused (already FAILED): "
        f"{result.tally.cancels_refused}"
    )
    chaos_verdict.say_errors(result.errors_by_type)
    say(
        f"  processes that exited on their own (restarted, as the compose file's restart "
        f"policy would): {len(result.process_exits)}"
    )
    for exit_line in result.process_exits[:EXAMPLES_SHOWN]:
        say(f"  - {exit_line}")
    chaos_verdict.print_result(result)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    return chaos_verdict.exit_code_of("chaos", lambda: run(options), report)


if __name__ == "__main__":
    sys.exit(main())

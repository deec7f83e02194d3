"""``make demo``: the whole pipeline end to end, with a real worker, in under a minute.

Embedded by default (no server): a fresh SQLite file and Celery's filesystem transport in a
new folder ``data/demo-<stamp>-<tag>`` (under ``$STOCK_SYNC_DATA_DIR`` when that is set).
With ``STOCK_SYNC_DATABASE_URL`` / ``STOCK_SYNC_BROKER_URL`` set it runs against those
servers instead, touching only its own orders, SKUs and queue (all named after the run's tag).

It starts the fake microservice in this process and a real ``celery worker`` subprocess,
submits about twenty orders covering every path of the lifecycle, cancels one after it
completed, waits until everything settled, prints what happened, checks its invariants and
stops what it started. Exit codes: 0 all good, 1 an invariant broke or the demo failed,
130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from stock_sync.adapters import schema
from stock_sync.adapters.db import reset_databases
from stock_sync.adapters.logging_setup import configure_json_logging
from stock_sync.adapters.models import PendingStockOperation
from stock_sync.adapters.settings import DEFAULT_DATA_DIR, Settings, get_settings
from stock_sync.adapters.stock_ledger import get_levels, ledger_sum, set_stock
from stock_sync.composition import Services, reset_services
from stock_sync.domain.errors import StockSyncError
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.statuses import TERMINAL_STATUSES, OperationStatus
from stock_sync.entrypoints import render
from stock_sync.services.queries import operation_details
from stock_sync_dev import processes
from stock_sync_fake import FakeMicroservice

S = OperationStatus
REPO_ROOT = Path(__file__).resolve().parents[2]
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
SETTLE_TIMEOUT_S = 120.0
POLL_INTERVAL_S = 0.2
WORKER_GRACE_S = 10.0
ACCOUNT = "demo-shop"
# Random 503s on any request; this seed draws exactly two in the first 70 requests, so no
# stage can exceed its retry limit because of them (knobs add at most 2 failures per stage).
GLOBAL_ERROR_RATE = 0.03
FAKE_SEED = 2
CANCELLED_BY = "demo-operator"
CANCEL_REASON = "customer changed their mind"
TERMINAL = frozenset(status.value for status in TERMINAL_STATUSES)

# Fast retries so failures settle in seconds; the worker and this process share them.
DEMO_SETTINGS = {
    # the embedded set-up for whichever URL is not set (production refuses to start without)
    "STOCK_SYNC_EMBEDDED": "1",
    "STOCK_SYNC_RETRY_BACKOFF_BASE_S": "0.2",
    "STOCK_SYNC_RETRY_BACKOFF_MAX_S": "1",
    "STOCK_SYNC_MAX_RETRIES_PENDING": "4",
    "STOCK_SYNC_MAX_RETRIES_PROCESSING": "4",
    "STOCK_SYNC_MAX_RETRIES_DEDUCTION": "4",
    "STOCK_SYNC_MAX_RETRIES_STOCK_DEDUCTED": "4",
    "STOCK_SYNC_MAX_RETRIES_ROLLBACK": "4",
    "STOCK_SYNC_MICROSERVICE_TIMEOUT_S": "1",
    "STOCK_SYNC_LOG_LEVEL": "INFO",
}


class DemoError(Exception):
    """The demo could not run to the end; the message says why and where to look."""


class Interrupted(Exception):
    """A termination signal: unwind like Ctrl-C so everything started gets stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


# --- the run and its scenarios --------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One demo run: every name it creates carries ``tag`` so runs never collide."""

    tag: str
    stamp: str

    @classmethod
    def new(cls) -> Run:
        return cls(tag=secrets.token_hex(3), stamp=time.strftime("%Y%m%d-%H%M%S"))

    @property
    def queue(self) -> str:
        return f"demo-{self.tag}"

    def order_id(self, key: str) -> str:
        return f"demo-{self.tag}-{key}"

    def sku(self, name: str) -> str:
        return f"{name}-{self.tag}"


@dataclass(frozen=True)
class Scenario:
    """An order the demo submits and the outcome it must reach."""

    key: str
    title: str
    lines: tuple[tuple[str, int], ...]  # (SKU name without the run tag, quantity)
    expected: OperationStatus
    knobs: Mapping[str, Any] = field(default_factory=dict)
    upstream_status: str = "READY_FOR_PROCESSING"
    account_name: str | None = ACCOUNT
    expected_error_type: str | None = None
    cancel_after_completion: bool = False

    @property
    def takes_stock(self) -> bool:
        """Whether the order's lines stay deducted at the end."""
        return self.expected is S.COMPLETED and not self.cancel_after_completion


STARTING_STOCK = {"MUG": 40, "TEE": 25, "CAP": 15, "POSTER": 2}


def _happy(key: str, *lines: tuple[str, int], account_name: str | None = ACCOUNT) -> Scenario:
    return Scenario(key, "happy path", lines, S.COMPLETED, account_name=account_name)


SCENARIOS: tuple[Scenario, ...] = (
    _happy("01", ("MUG", 2)),
    _happy("02", ("TEE", 1), ("CAP", 1)),
    _happy("03", ("MUG", 1), ("TEE", 2)),
    _happy("04", ("CAP", 3)),
    _happy("05", ("MUG", 4), ("CAP", 1), account_name=None),  # account filled from the order
    _happy("06", ("TEE", 3)),
    _happy("07", ("MUG", 1)),
    _happy("08", ("TEE", 1), ("MUG", 1)),
    _happy("09", ("CAP", 2)),
    _happy("10", ("MUG", 3), ("TEE", 1)),
    _happy("11", ("POSTER", 1)),
    _happy("12", ("TEE", 2), ("CAP", 1)),
    Scenario("13", "paid late (2 reads unpaid)", (("MUG", 1),), S.COMPLETED,
             knobs={"ready_after_reads": 2}),
    Scenario("14", "404 right after the order event", (("TEE", 1),), S.COMPLETED,
             knobs={"not_found_reads": 1}),
    Scenario("15", "GET fails twice (503)", (("CAP", 1),), S.COMPLETED, knobs={"fail_gets": 2}),
    Scenario("16", "PUT fails twice (503)", (("MUG", 2),), S.COMPLETED, knobs={"fail_puts": 2}),
    Scenario("17", "GET and PUT fail once", (("TEE", 1), ("MUG", 1)), S.COMPLETED,
             knobs={"fail_gets": 1, "fail_puts": 1}),
    Scenario("18", "cancelled upstream", (("MUG", 5),), S.CANCELLED,
             upstream_status="CANCELLED"),
    Scenario("19", "insufficient stock", (("POSTER", 5),), S.FAILED,
             expected_error_type="InsufficientStock"),
    Scenario("20", "cancelled after completion", (("MUG", 3), ("CAP", 2)), S.CANCELLED,
             cancel_after_completion=True),
)  # fmt: skip


def order_body(run: Run, scenario: Scenario) -> dict[str, Any]:
    """The order as the fake microservice serves it."""
    order_id = run.order_id(scenario.key)
    return {
        "id": order_id,
        "account_name": ACCOUNT,
        "status": scenario.upstream_status,
        "fulfillment_status": "NEW",
        "line_items": [
            {"id": f"{order_id}-line-{index}", "sku": run.sku(name), "quantity": quantity}
            for index, (name, quantity) in enumerate(scenario.lines, start=1)
        ],
    }


def expected_final_stock(run: Run, scenarios: Sequence[Scenario]) -> dict[str, int]:
    """Starting stock minus the lines of every order that keeps its deduction."""
    levels = {run.sku(name): quantity for name, quantity in STARTING_STOCK.items()}
    for scenario in scenarios:
        if scenario.takes_stock:
            for name, quantity in scenario.lines:
                levels[run.sku(name)] -= quantity
    return levels


# --- environment ------------------------------------------------------------------------------


def make_run_folder(run: Run) -> Path:
    """A new, empty folder for this run's SQLite file, broker files and logs."""
    parent = Path(os.environ.get("STOCK_SYNC_DATA_DIR") or DEFAULT_DATA_DIR)
    folder = (parent / f"demo-{run.stamp}-{run.tag}").resolve()
    folder.mkdir(parents=True, exist_ok=False)
    return folder


def configure_environment(run: Run, folder: Path, microservice_url: str) -> Settings:
    """Point this process (and the worker it starts) at the run's folder, queue and fake."""
    os.environ.update(DEMO_SETTINGS)
    os.environ.update(
        {
            "STOCK_SYNC_DATA_DIR": str(folder),
            "STOCK_SYNC_QUEUE_NAME": run.queue,
            # never an inherited one: on a shared broker it could be production's
            "STOCK_SYNC_MAINTENANCE_QUEUE_NAME": f"{run.queue}_maintenance",
            "STOCK_SYNC_MICROSERVICE_URL": microservice_url,
        }
    )
    get_settings.cache_clear()
    reset_databases()
    reset_services()
    return get_settings()


def describe_backend(settings: Settings) -> str:
    """Which database and broker the run uses, passwords hidden."""
    if not (settings.database_url or settings.broker_url):
        return "embedded: SQLite file + Celery's filesystem transport, no server"
    database = make_url(settings.effective_database_url).render_as_string(hide_password=True)
    return f"database {database}, broker {maybe_sanitize_url(settings.effective_broker_url)}"


# --- the worker subprocess --------------------------------------------------------------------


class WorkerProcess:
    """A real ``celery -A tasks worker`` in its own session, logging to a file.

    Its own session keeps a terminal's Ctrl-C away from it: the demo stops it in order.
    """

    def __init__(self, run: Run, folder: Path) -> None:
        self.log_path = folder / "worker.log"
        self._run = run
        self._folder = folder
        self._process: processes.CeleryProcess | None = None

    def arguments(self) -> list[str]:
        # no --loglevel: the worker then logs at STOCK_SYNC_LOG_LEVEL (INFO, set above)
        return processes.worker_arguments(
            "threads", 4, loglevel=None, hostname=f"{self._run.queue}@%h"
        )

    def start(self) -> int:
        """Start the worker with this process's environment; returns its pid."""
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")])
        )
        self._process = processes.CeleryProcess(
            self.arguments(), environment, self.log_path, cwd=self._folder
        )
        return self._process.pid

    def ensure_alive(self) -> None:
        """Raise DemoError with the end of the worker's log if it exited."""
        code = None if self._process is None else self._process.exit_code()
        if code is None:
            return
        raise DemoError(
            f"the worker exited with code {code}; "
            f"end of {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def stop(self, grace_s: float = WORKER_GRACE_S) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL after ``grace_s``; safe to call twice."""
        process, self._process = self._process, None
        if process is not None:
            process.stop(grace_s)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


# --- setting up and submitting ----------------------------------------------------------------


@dataclass
class Tracked:
    """A submitted scenario and what the demo did with it."""

    scenario: Scenario
    order_id: str
    operation_id: uuid.UUID
    status: str = S.PENDING.value
    cancellation_requested: bool = False
    rollback_state: str | None = None  # pending | completed | failed, after the cancel

    @property
    def settled(self) -> bool:
        """Nothing more will happen to it (a cancelled-after-completion order waits for its
        microservice rollback too)."""
        if self.status not in TERMINAL:
            return False
        if self.scenario.cancel_after_completion and self.cancellation_requested:
            return self.rollback_state != "pending"
        return not (self.scenario.cancel_after_completion and self.status == S.COMPLETED.value)


def stock_up(services: Services, run: Run) -> None:
    with services.database.transaction() as session:
        for name, quantity in STARTING_STOCK.items():
            set_stock(session, run.sku(name), quantity)


def submit_all(
    services: Services, fake: FakeMicroservice, run: Run, scenarios: Sequence[Scenario]
) -> list[Tracked]:
    """Publish every order on the fake, then submit each one's operation."""
    from stock_sync.producer import submit_operation

    for scenario in scenarios:
        fake.add_order(order_body(run, scenario), **scenario.knobs)
    tracked = []
    for scenario in scenarios:
        order_id = run.order_id(scenario.key)
        operation_id = submit_operation(order_id, scenario.account_name, services=services)
        tracked.append(Tracked(scenario, order_id, operation_id))
    return tracked


# --- waiting ----------------------------------------------------------------------------------


def refresh(services: Services, tracked: Sequence[Tracked]) -> None:
    """Read every tracked operation's status (one short transaction)."""
    by_id = {item.operation_id: item for item in tracked}
    with services.database.transaction() as session:
        rows = session.execute(
            select(PendingStockOperation.id, PendingStockOperation.status).where(
                PendingStockOperation.id.in_(list(by_id))
            )
        )
        for operation_id, status in rows:
            by_id[operation_id].status = status
    for item in tracked:
        if item.cancellation_requested and item.rollback_state == "pending":
            item.rollback_state = services.cancellation.result_of(
                item.operation_id
            ).microservice_rollback


def cancel_completed(services: Services, tracked: Sequence[Tracked]) -> None:
    """Cancel each cancel-after-completion order once it has COMPLETED."""
    from stock_sync.producer import request_cancellation

    for item in tracked:
        wanted = item.scenario.cancel_after_completion and not item.cancellation_requested
        if wanted and item.status == S.COMPLETED.value:
            result = request_cancellation(
                item.operation_id, CANCELLED_BY, CANCEL_REASON, services=services
            )
            item.cancellation_requested = True
            item.status = result.final_status.value
            item.rollback_state = result.microservice_rollback


def lowest_levels(services: Services, skus: Sequence[str], seen: dict[str, int]) -> None:
    """Remember the lowest level each SKU ever showed (it must never go below zero)."""
    with services.database.transaction() as session:
        for sku, quantity in get_levels(session, skus).items():
            seen[sku] = min(quantity, seen.get(sku, quantity))


def progress_line(tracked: Sequence[Tracked]) -> str:
    settled = [item for item in tracked if item.settled]
    counts = {s: sum(1 for item in settled if item.status == s.value) for s in TERMINAL_STATUSES}
    return (
        f"  {len(settled)}/{len(tracked)} settled: {counts[S.COMPLETED]} completed, "
        f"{counts[S.FAILED]} failed, {counts[S.CANCELLED]} cancelled"
    )


class Progress:
    """One progress line on stderr: redrawn in place on a terminal, a line per change else."""

    def __init__(self, stream: IO[str] = sys.stderr) -> None:
        self._stream = stream
        self._last = ""
        self._interactive = stream.isatty()

    def show(self, line: str) -> None:
        if line == self._last:
            return
        self._last = line
        sys.stdout.flush()  # what was printed before stays before the progress
        self._stream.write(f"\r{line}\033[K" if self._interactive else f"{line}\n")
        self._stream.flush()

    def done(self) -> None:
        if self._interactive and self._last:
            self._stream.write("\n")
            self._stream.flush()


def wait_until_settled(
    services: Services,
    worker: WorkerProcess,
    tracked: Sequence[Tracked],
    lowest: dict[str, int],
    timeout_s: float,
) -> None:
    """Poll until every order settled, cancelling the completed one on the way.

    Raises DemoError naming the unsettled orders after ``timeout_s`` or if the worker died.
    """
    progress = Progress()
    skus = list(lowest)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            worker.ensure_alive()
            refresh(services, tracked)
            cancel_completed(services, tracked)
            lowest_levels(services, skus, lowest)
            progress.show(progress_line(tracked))
            if all(item.settled for item in tracked):
                return
            if time.monotonic() > deadline:
                raise DemoError(unsettled_message(tracked, timeout_s, worker.log_path))
            time.sleep(POLL_INTERVAL_S)
    finally:
        progress.done()


def unsettled_message(tracked: Sequence[Tracked], timeout_s: float, log_path: Path) -> str:
    stuck = ", ".join(
        f"{item.order_id} ({item.status}"
        + (f", rollback {item.rollback_state}" if item.rollback_state else "")
        + ")"
        for item in tracked
        if not item.settled
    )
    return f"not settled after {timeout_s:.0f} s: {stuck}; see {log_path}"


# --- the report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """The final state of a tracked order, read back for the report and the checks."""

    tracked: Tracked
    details: dict[str, Any]
    fulfillment_status: str
    applied_puts: tuple[str, ...]  # fulfillment statuses the microservice applied, in order

    @property
    def retries(self) -> int:
        return sum(
            1 for e in self.details["events"] if e["action"] == LogAction.RETRY_SCHEDULED.value
        )


def read_outcomes(
    services: Services, fake: FakeMicroservice, tracked: Sequence[Tracked]
) -> list[Outcome]:
    with services.database.transaction() as session:
        details = [operation_details(session, item.operation_id) for item in tracked]
    puts = fake.fulfillment_requests()
    return [
        Outcome(
            item,
            detail,
            fake.order(item.order_id)["fulfillment_status"],
            tuple(
                put["status"]
                for put in puts
                if put["order_id"] == item.order_id and put["outcome"] == "applied"
            ),
        )
        for item, detail in zip(tracked, details, strict=True)
    ]


def note_for(outcome: Outcome) -> str:
    details = outcome.details
    if details["status"] == S.FAILED.value:
        return f"{details['last_error_type']}: {shorten(details['last_error'] or '', 70)}"
    if details["status"] == S.CANCELLED.value:
        note = f"by {details['cancelled_by']}: {details['cancellation_reason']}"
        if outcome.tracked.cancellation_requested:
            note += f"; stock back, microservice rollback {outcome.tracked.rollback_state}"
        return note
    errors = sorted(
        {
            str(e["details"]["error_type"])
            for e in details["events"]
            if e["details"].get("error_type")
        }
    )
    return f"recovered from {', '.join(errors)}" if errors else ""


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def states_table(outcomes: Sequence[Outcome]) -> str:
    return render.table(
        ("order", "scenario", "status", "retries", "fulfillment", "note"),
        [
            (
                o.tracked.order_id,
                o.tracked.scenario.title,
                o.details["status"],
                o.retries,
                o.fulfillment_status,
                note_for(o),
            )
            for o in outcomes
        ],
    )


@dataclass(frozen=True)
class StockRow:
    sku: str
    start: int
    final: int | None
    expected: int
    ledger: int
    lowest: int


def read_stock(run: Run, services: Services, lowest: Mapping[str, int]) -> list[StockRow]:
    expected = expected_final_stock(run, SCENARIOS)
    with services.database.transaction() as session:
        levels = get_levels(session, expected)
        return [
            StockRow(
                sku=run.sku(name),
                start=start,
                final=levels.get(run.sku(name)),
                expected=expected[run.sku(name)],
                ledger=ledger_sum(session, run.sku(name)),
                lowest=min(lowest.get(run.sku(name), start), levels.get(run.sku(name), start)),
            )
            for name, start in STARTING_STOCK.items()
        ]


def stock_table(rows: Sequence[StockRow]) -> str:
    return render.table(
        ("sku", "start", "final", "expected", "ledger sum", "lowest seen"),
        [(r.sku, r.start, r.final, r.expected, r.ledger, r.lowest) for r in rows],
    )


def cancelled_after_completion_report(services: Services, outcome: Outcome) -> str:
    result = services.cancellation.result_of(outcome.tracked.operation_id)
    restored = ", ".join(f"{m.sku} +{m.delta}" for m in result.restored_movements) or "nothing"
    return "\n".join(
        [
            f"Cancelled after completion: {outcome.tracked.order_id}",
            f"  {result.message}",
            f"  stock restored: {restored}",
            f"  fulfillment PUTs applied: {' -> '.join(outcome.applied_puts) or 'none'}",
            f"  microservice rollback: {result.microservice_rollback}; fulfillment status now "
            f"{outcome.fulfillment_status} (was "
            f"{outcome.details['fulfillment_status_before_sync']} before the sync)",
        ]
    )


# --- invariants -------------------------------------------------------------------------------


def broken_invariants(outcomes: Sequence[Outcome], stock: Sequence[StockRow]) -> list[str]:
    """Every invariant the demo checks that does not hold; empty when all hold."""
    problems = []
    for row in stock:
        if row.lowest < 0:
            problems.append(f"{row.sku} went negative ({row.lowest})")
        if row.final != row.ledger:
            problems.append(f"{row.sku} is {row.final} but its ledger sums to {row.ledger}")
        if row.final != row.expected:
            problems.append(f"{row.sku} is {row.final}, expected {row.expected}")
    for outcome in outcomes:
        problems += scenario_problems(outcome)
    return problems


def scenario_problems(outcome: Outcome) -> list[str]:
    scenario, details = outcome.tracked.scenario, outcome.details
    name = f"{outcome.tracked.order_id} ({scenario.title})"
    if details["status"] != scenario.expected.value:
        return [f"{name} is {details['status']}, expected {scenario.expected.value}"]
    problems = []
    if scenario.expected_error_type and details["last_error_type"] != scenario.expected_error_type:
        problems.append(f"{name} failed with {details['last_error_type']}")
    if scenario.upstream_status == "CANCELLED" and details["cancelled_by"] != "marketplace":
        problems.append(f"{name} was cancelled by {details['cancelled_by']}, not the marketplace")
    expected_puts = expected_fulfillment_puts(scenario, details["fulfillment_status_before_sync"])
    if outcome.applied_puts != expected_puts:
        problems.append(
            f"{name}: fulfillment PUTs {outcome.applied_puts}, expected {expected_puts}"
        )
    if scenario.cancel_after_completion and outcome.tracked.rollback_state != "completed":
        problems.append(f"{name}: microservice rollback {outcome.tracked.rollback_state}")
    return problems


def expected_fulfillment_puts(scenario: Scenario, status_before_sync: str) -> tuple[str, ...]:
    """The fulfillment statuses the microservice must have applied, in order, once each."""
    if scenario.cancel_after_completion:
        return ("PROCESSING", status_before_sync)  # the sync, then the rollback
    return ("PROCESSING",) if scenario.expected is S.COMPLETED else ()


# --- main -------------------------------------------------------------------------------------


def delete_queue(settings: Settings) -> None:
    """Remove the run's queues (pipeline and maintenance: its worker declared both) and their
    bindings from a shared broker; warns if it cannot."""
    if settings.uses_filesystem_broker:
        return  # the whole broker folder belongs to this run
    from tasks import app

    for name in (settings.queue_name, settings.effective_maintenance_queue_name):
        try:
            with app.connection_for_write() as connection:
                # kombu deletes only the bindings it declared itself: declare, then delete
                queue = app.amqp.queues[name](connection.default_channel)
                queue.declare()
                queue.delete()
        except Exception as error:
            print(f"warning: could not delete queue {name}: {error}", file=sys.stderr)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into an exception while the demo runs, so cleanup still happens."""

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def configure_demo_logging(folder: Path, stack: contextlib.ExitStack) -> None:
    """This process's JSON logs go to ``demo.log``, not the terminal."""
    stream = stack.enter_context((folder / "demo.log").open("a"))
    configure_json_logging("INFO", stream)


def run_demo(timeout_s: float) -> int:
    """Run the demo; returns the exit code (DemoError and Ctrl-C propagate)."""
    started = time.monotonic()
    run = Run.new()
    folder = make_run_folder(run)
    with contextlib.ExitStack() as stack:
        configure_demo_logging(folder, stack)
        fake = stack.enter_context(FakeMicroservice(seed=FAKE_SEED))
        fake.set_faults(error_rate=GLOBAL_ERROR_RATE)
        settings = configure_environment(run, folder, fake.url)
        print(f"stock-sync demo, run {run.tag} ({describe_backend(settings)})")
        print(f"  run folder: {folder}")
        schema.upgrade(settings.effective_database_url)
        from stock_sync.producer import default_services  # after the run's environment

        services = default_services()  # with the Celery app's dispatcher
        worker = WorkerProcess(run, folder)
        stack.callback(delete_queue, settings)
        stack.callback(worker.stop)
        pid = worker.start()
        print(f"  worker: pid {pid}, queue {run.queue}, log {worker.log_path}")
        print(
            f"  fake microservice: {fake.url} ({GLOBAL_ERROR_RATE:.0%} random 503s, "
            "revisions as opaque strings, the way Allegro sends them)"
        )
        problems = exercise(run, services, fake, worker, timeout_s)
    elapsed = time.monotonic() - started
    if problems:
        print("\nINVARIANTS BROKEN:")
        print("\n".join(f"  - {problem}" for problem in problems))
        print(f"demo FAILED after {elapsed:.1f} s; logs in {folder}")
        return EXIT_FAILED
    print("\ninvariants: all hold (no negative stock, every level equals its ledger sum,")
    print("  final levels as expected, every order reached its expected outcome)")
    print(f"demo finished in {elapsed:.1f} s; logs in {folder}")
    return EXIT_OK


def exercise(
    run: Run,
    services: Services,
    fake: FakeMicroservice,
    worker: WorkerProcess,
    timeout_s: float,
) -> list[str]:
    """Stock up, submit every scenario, wait, print the report; the broken invariants."""
    stock_up(services, run)
    tracked = submit_all(services, fake, run, SCENARIOS)
    print(f"submitted {len(tracked)} orders; waiting (at most {timeout_s:.0f} s)")
    lowest = {run.sku(name): quantity for name, quantity in STARTING_STOCK.items()}
    wait_until_settled(services, worker, tracked, lowest, timeout_s)
    outcomes = read_outcomes(services, fake, tracked)
    stock = read_stock(run, services, lowest)
    print_report(services, outcomes, stock)
    return broken_invariants(outcomes, stock)


def print_report(
    services: Services, outcomes: Sequence[Outcome], stock: Sequence[StockRow]
) -> None:
    print("\nFinal states")
    print(states_table(outcomes))
    print(f"\n{progress_line([o.tracked for o in outcomes]).strip()}")
    print("\nStock levels")
    print(stock_table(stock))
    showcase = next(o for o in outcomes if o.tracked.scenario.cancel_after_completion)
    print()
    print(cancelled_after_completion_report(services, showcase))
    print(f"\nTimeline of {showcase.tracked.order_id}")
    print(render.operation(showcase.details))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stock_sync_dev.demo", description=__doc__)
    parser.add_argument(
        "--timeout",
        type=float,
        default=SETTLE_TIMEOUT_S,
        help="seconds to wait for every order to settle (default %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        with sigterm_unwinds():
            return run_demo(args.timeout)
    except KeyboardInterrupt:
        print("\ninterrupted: worker and fake microservice stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Interrupted as signalled:
        print(f"\n{signalled}: worker and fake microservice stopped", file=sys.stderr)
        return signalled.exit_code
    except DemoError as error:
        print(f"\ndemo failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (StockSyncError, SQLAlchemyError) as error:
        # expected trouble (a server down, a bad setting) gets one line, not a traceback
        first_line = (str(error).strip() or repr(error)).splitlines()[0]
        print(f"\ndemo failed: {type(error).__name__}: {first_line}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

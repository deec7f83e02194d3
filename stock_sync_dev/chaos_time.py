"""The fault suite's time modes: waiting is not failing (``python -m
stock_sync_dev.chaos_time --mode backlog|outage``, ``make chaos MODE=backlog|outage``).

- **backlog**: every order is submitted while no worker runs, and the queue is left to age
  several times the stuck threshold; then two workers and beat start (the sweep every second).
  Nothing is wrong but the wait: no operation may fail, the sweep may re-drive nothing, and
  no stage may run twice for an operation.
- **outage**: the microservice is down longer than the retry budgets while the orders come
  in: the first half cannot be loaded (every request 503), the second half is loaded and
  deducted but every sync PUT is refused. All of them end FAILED. The outage ends, an operator
  runs ``stock-sync retry --failed --yes``, and every order's latest operation must complete
  with one deduction and one sync, ``stock-sync check`` clean.

Both reuse the storm's rig (private redis-server, throwaway database, the fake microservice,
real Celery processes) and its assertions; one summary line ends the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from stock_sync.adapters.db import reset_databases
from stock_sync.adapters.models import OperationEvent, PendingStockOperation, StockMovement
from stock_sync.adapters.settings import ENV_PREFIX
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.stock import MovementReason
from stock_sync.producer import submit_operation
from stock_sync_dev import chaos, chaos_verdict, cli_args, processes
from stock_sync_dev.bench.harness import process_environment, say
from stock_sync_dev.chaos_checks import (
    Assertion,
    Calm,
    completed_orders_synced_once,
    event_counts,
    every_operation_terminal,
    ledger_sums_to_level,
    one_deduction_per_order,
    reconciliation_clean,
    stock_levels_as_expected,
    wait_for_calm,
)
from stock_sync_dev.chaos_faults import HarnessError
from stock_sync_dev.chaos_scenario import ACCOUNT, Line, PlannedOrder, Scenario

SKUS = 20
# The stage runs an operation needs with nothing going wrong: one start event per stage.
STAGE_STARTS = (
    LogAction.LINE_ITEMS_LOADING.value,
    LogAction.STOCK_VALIDATION_STARTED.value,
    LogAction.STOCK_DEDUCTION_STARTED.value,
    LogAction.MICROSERVICE_SYNC_STARTED.value,
)
OUTAGE_FAULTS = {"error_rate": 1.0}  # every contract request answered 503
UNREACHABLE_PUTS = 1_000_000  # fail_puts of the orders whose syncs the outage refuses


def plain_scenario(order_count: int, tag: str) -> Scenario:
    """``order_count`` one-line orders over 20 SKUs, each stocked for all of its orders: no
    order can run short, so any failure is the harness's finding, never the scenario's."""
    skus = [f"TIME-{index:02d}" for index in range(SKUS)]
    orders = tuple(
        PlannedOrder(
            f"chaos-{tag}-{index:05d}",
            (Line(skus[index % SKUS], 1 + index % 2),),
            (ACCOUNT,),
        )
        for index in range(order_count)
    )
    demand: Counter[str] = Counter()
    for order in orders:
        demand[order.lines[0].sku] += order.lines[0].quantity
    return Scenario(orders, {sku: demand[sku] + 5 for sku in skus})


@dataclass(frozen=True)
class TimeReport:
    """A time mode's figures and assertions; ``figures`` in the order the line shows them."""

    mode: str
    figures: dict[str, Any]
    assertions: list[Assertion]

    @property
    def ok(self) -> bool:
        return all(assertion.ok for assertion in self.assertions)

    def summary_line(self) -> str:
        figures = " ".join(f"{name}={value}" for name, value in self.figures.items())
        violated = [a.name for a in self.assertions if not a.ok]
        verdict = "OK" if self.ok else "FAILED (" + ", ".join(violated) + ")"
        return f"chaos {self.mode}: {figures} : {verdict}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            **self.figures,
            "ok": self.ok,
            "assertions": [assertion.to_dict() for assertion in self.assertions],
            "summary": self.summary_line(),
        }


# --- what the database says happened ------------------------------------------------------


def stage_runs(database: Any) -> Counter[str]:
    """How many times each stage started, over every operation (its start events)."""
    action = OperationEvent.action
    return Counter(dict(event_counts(database, action, action.in_(STAGE_STARTS))))


def sweep_redrives(database: Any) -> int:
    """Re-drives the stuck sweep recorded (its RETRY_SCHEDULED events)."""
    event = OperationEvent
    with database.transaction() as session:
        events = session.scalars(
            select(event.details).where(event.action == LogAction.RETRY_SCHEDULED.value)
        )
        return sum("re-driven by the stuck sweep" in str(details) for details in events)


def status_counts(database: Any) -> Counter[str]:
    op = PendingStockOperation
    with database.transaction() as session:
        rows = session.execute(
            select(op.status, func.count())
            .where(op.operation_type == "order_deduction")
            .group_by(op.status)
        )
        return Counter({status: int(count) for status, count in rows})


def longest_wait_s(database: Any) -> float:
    """The longest a message waited in the queue: from an operation's creation (its first
    message) to the start of its load, over every operation."""
    op, event = PendingStockOperation, OperationEvent
    with database.transaction() as session:
        waits = session.execute(
            select(op.created_at, func.min(event.at))
            .join(event, event.operation_id == op.id)
            .where(event.action == LogAction.LINE_ITEMS_LOADING.value)
            .group_by(op.id, op.created_at)
        ).all()
    return max(((started - created).total_seconds() for created, started in waits), default=0.0)


def latest_operations(database: Any) -> list[PendingStockOperation]:
    """Each order's live (latest) order deduction: the one without a successor."""
    op = PendingStockOperation
    with database.transaction() as session:
        return list(
            session.scalars(
                select(op).where(
                    op.operation_type == "order_deduction", op.successor_operation_id.is_(None)
                )
            )
        )


def effective_deductions_per_order(database: Any) -> Counter[str]:
    """Per order, the units its deduction rows hold after handovers and restorations (an order
    deducted once holds its quantity exactly once)."""
    movement, op = StockMovement, PendingStockOperation
    holding = (MovementReason.DEDUCTION.value, MovementReason.HANDOVER.value)
    with database.transaction() as session:
        rows = session.execute(
            select(op.order_id, func.sum(movement.delta))
            .join(op, op.id == movement.operation_id)
            .where(movement.reason.in_(holding))
            .group_by(op.order_id)
        )
        return Counter({order_id: -int(total or 0) for order_id, total in rows})


# --- the assertions of the time modes -----------------------------------------------------


def nothing_failed(statuses: Counter[str]) -> Assertion:
    check = Assertion("nothing_failed", "no operation ended FAILED: waiting is not failing")
    if statuses.get("failed"):
        check.violated(f"{statuses['failed']} operations ended FAILED")
    return check


def nothing_redriven(redrives: int) -> Assertion:
    check = Assertion(
        "nothing_redriven", "the sweep re-drove nothing: a queued message is not a lost one"
    )
    if redrives:
        check.violated(f"the sweep re-drove {redrives} operations")
    return check


def every_stage_ran_once(runs: Counter[str], operations: int) -> Assertion:
    check = Assertion(
        "every_stage_ran_once", "each stage started exactly once per operation (no copies)"
    )
    for action in STAGE_STARTS:
        if runs[action] != operations:
            check.violated(f"{action}: {runs[action]} starts for {operations} operations")
    return check


def every_latest_operation_completed(database: Any, scenario: Scenario) -> Assertion:
    check = Assertion(
        "every_latest_operation_completed",
        "every order's latest operation (after the retries) is COMPLETED",
    )
    latest = {row.order_id: row for row in latest_operations(database)}
    for order in scenario.orders:
        row = latest.get(order.order_id)
        if row is None or row.status != "completed":
            state = row.status if row is not None else "no operation"
            check.violated(f"order {order.order_id}: {state}", row.id if row else None)
    return check


def one_effective_deduction_per_order(database: Any, scenario: Scenario) -> Assertion:
    check = Assertion(
        "one_effective_deduction_per_order",
        "every order's deduction rows hold its quantity exactly once (a retry took the failed "
        "one's deduction over instead of deducting again)",
    )
    held = effective_deductions_per_order(database)
    for order in scenario.orders:
        wanted = sum(line.quantity for line in order.lines)
        if held[order.order_id] != wanted:
            check.violated(f"order {order.order_id}: holds {held[order.order_id]}, asks {wanted}")
    return check


def standard_assertions(rig: Any, snapshot: Any) -> list[Assertion]:
    return [
        every_operation_terminal(snapshot),
        stock_levels_as_expected(snapshot),
        ledger_sums_to_level(snapshot),
        completed_orders_synced_once(snapshot),
        one_deduction_per_order(rig.database),
        reconciliation_clean(rig.variables),
    ]


# --- the runs -----------------------------------------------------------------------------


def submit_all(scenario: Scenario) -> None:
    for order in scenario.orders:
        submit_operation(order.order_id, ACCOUNT)


def run_backlog(options: Any, age_factor: float) -> TimeReport:
    """Submit with no worker, let the queue age ``age_factor`` stuck thresholds, then start
    the workers and beat and wait for every operation to settle."""
    stuck_after_s = float(chaos.CHAOS_SETTINGS["STUCK_AFTER_S"])
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stock-sync-chaos-")))
        scenario = plain_scenario(options.orders, uuid.uuid4().hex[:8])
        say(f"[1/4] backlog: {options.orders} orders submitted while no worker runs")
        rig = chaos.start_rig(stack, options, workdir, scenario=scenario, start_fleet=False)
        submitted_at = time.monotonic()
        submit_all(scenario)
        queue = rig.variables[f"{ENV_PREFIX}QUEUE_NAME"]
        queued = rig.broker.queue_length(queue)
        age_s = age_factor * stuck_after_s
        say(f"[2/4] {queued} messages queued; letting the queue age {age_s:.0f} s")
        time.sleep(max(0.0, submitted_at + age_s - time.monotonic()))
        queue_age_s = time.monotonic() - submitted_at
        say(f"    workers and beat start with the oldest message {queue_age_s:.0f} s old")
        rig.fleet.start()
        calm = _settle(rig, options)
        say("[4/4] judging")
        statuses = status_counts(rig.database)
        runs = stage_runs(rig.database)
        redrives = sweep_redrives(rig.database)
        longest_s = longest_wait_s(rig.database)
        snapshot = chaos.take_snapshot(rig)
        assertions = [
            nothing_failed(statuses),
            nothing_redriven(redrives),
            every_stage_ran_once(runs, options.orders),
            *standard_assertions(rig, snapshot),
        ]
        chaos.show_violations(rig, assertions)
    duplicates = sum(runs.values()) - len(STAGE_STARTS) * options.orders
    figures = {
        "orders": options.orders,
        "stuck_after_s": stuck_after_s,
        "queue_age_s": round(queue_age_s, 1),
        "longest_wait_s": round(longest_s, 1),
        "longest_wait_x_stuck": round(longest_s / stuck_after_s, 1),
        "completed": statuses.get("completed", 0),
        "failed": statuses.get("failed", 0),
        "redriven": redrives,
        "duplicate_stage_runs": duplicates,
        "settle_s": round(calm.seconds, 1),
    }
    return TimeReport("backlog", figures, assertions)


def run_outage(options: Any) -> TimeReport:
    """The microservice down longer than every budget, then ``stock-sync retry --failed``."""
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stock-sync-chaos-")))
        scenario = plain_scenario(options.orders, uuid.uuid4().hex[:8])
        half = len(scenario.orders) // 2
        load_half, sync_half = scenario.orders[:half], scenario.orders[half:]
        rig = chaos.start_rig(stack, options, workdir, scenario=scenario)
        for order in sync_half:  # loaded and deducted, but every sync PUT refused
            rig.fake.add_order(order.body(), fail_puts=UNREACHABLE_PUTS)
        say(f"[1/4] outage: the microservice answers 503 to all; {half} orders come in")
        rig.fake.set_faults(**OUTAGE_FAULTS)
        submit_all(Scenario(load_half, scenario.initial_stock))
        _wait_until_all_terminal(rig, options, "the loads fail")
        say(f"[2/4] reads answered again, sync PUTs still refused; {len(sync_half)} more come in")
        rig.fake.set_faults(error_rate=0.0)
        submit_all(Scenario(sync_half, scenario.initial_stock))
        _wait_until_all_terminal(rig, options, "the syncs fail")
        before = status_counts(rig.database)
        failed_deducted = _failed_after_deduction(rig.database)
        say(f"    before the retry: {dict(before)} ({failed_deducted} failed after deducting)")
        for order in sync_half:  # the outage ends
            rig.fake.add_order(order.body())
        say("[3/4] the outage is over: stock-sync retry --failed --yes")
        retried = _retry_failed(rig.variables)
        calm = _settle(rig, options)
        say("[4/4] judging")
        latest = Counter(row.status for row in latest_operations(rig.database))
        snapshot = chaos.take_snapshot(rig)
        assertions = [
            every_latest_operation_completed(rig.database, scenario),
            one_effective_deduction_per_order(rig.database, scenario),
            *standard_assertions(rig, snapshot),
        ]
        chaos.show_violations(rig, assertions)
    figures = {
        "orders": options.orders,
        "failed_before": before.get("failed", 0),
        "failed_after_deducting": failed_deducted,
        "retried": len(retried["retried"]),
        "latest_completed": latest.get("completed", 0),
        "latest_other": sum(count for status, count in latest.items() if status != "completed"),
        "settle_s": round(calm.seconds, 1),
    }
    return TimeReport("outage", figures, assertions)


def _wait_until_all_terminal(rig: Any, options: Any, what: str) -> Calm:
    say(f"    waiting until {what} (every retry budget spent)")
    calm = wait_for_calm(rig.database, options.settle_timeout_s)
    if not calm.reached:
        raise _harness_error(f"the operations did not settle while {what}")
    return calm


def _failed_after_deduction(database: Any) -> int:
    op = PendingStockOperation
    with database.transaction() as session:
        query = select(func.count()).where(
            op.status == "failed", op.failed_stage == "sync_microservice"
        )
        return int(session.scalar(query) or 0)


def _retry_failed(variables: dict[str, str]) -> dict[str, Any]:
    """``stock-sync retry --failed --yes --json`` as an operator runs it."""
    arguments = ["retry", "--failed", "--yes", "--json"]
    result = processes.stock_sync(arguments, process_environment(variables), 600)
    if result.returncode != 0:
        raise _harness_error(f"stock-sync retry exited {result.returncode}: {result.stderr}")
    payload: dict[str, Any] = json.loads(result.stdout)
    say(f"    retried {len(payload['retried'])} operations, refused {len(payload['refused'])}")
    return payload


def _harness_error(message: str) -> Exception:
    return HarnessError(message)


def _settle(rig: Any, options: Any) -> Calm:
    """Wait until every operation is terminal, then stop the Celery processes (the time modes
    kill nothing, so there is no keeper to stop)."""
    say(f"[3/4] waiting for every operation to settle (at most {options.settle_timeout_s:.0f} s)")
    calm = wait_for_calm(rig.database, options.settle_timeout_s)
    rig.fleet.stop()
    reset_databases()
    rig.database.dispose()
    return calm


def report(result: TimeReport, *, json_output: bool) -> None:
    say("")
    for assertion in result.assertions:
        verdict = "ok" if assertion.ok else f"VIOLATED ({len(assertion.found)})"
        say(f"  {assertion.name:<36} {verdict}")
    if json_output:
        say(result.summary_line())
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.summary_line(), flush=True)


# --- command line -------------------------------------------------------------------------

MODES = ("backlog", "outage")
DEFAULT_ORDERS = {"backlog": 1200, "outage": 400}
# The backlog's queue ages this many stuck thresholds before a worker starts: the ratio of a
# queue three hours behind at the defaults (900 s), as the run that found the fault measured.
DEFAULT_BACKLOG_AGE = 12.0


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[chaos.Options, str, float]:
    parser = argparse.ArgumentParser(
        prog="python -m stock_sync_dev.chaos_time",
        description="Waiting is not failing: a backlog older than the stuck threshold, or a "
        "microservice outage longer than the retry budgets followed by `stock-sync retry "
        "--failed`; then the invariants.",
    )
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--orders", type=int, default=None)
    parser.add_argument("--seed", type=int, default=chaos.DEFAULT_SEED)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--backlog-age",
        type=float,
        default=DEFAULT_BACKLOG_AGE,
        help="backlog: how many stuck thresholds the queue ages before the workers start "
        f"(default {DEFAULT_BACKLOG_AGE:g})",
    )
    parser.add_argument("--settle-timeout", type=float, default=None)
    cli_args.add_postgres_url(parser)
    args = parser.parse_args(argv)
    orders = args.orders or DEFAULT_ORDERS[args.mode]
    if orders < 2:
        parser.error(f"--orders must be >= 2, got {orders}")
    options = chaos.Options(
        orders=orders,
        seed=args.seed,
        json_output=args.json,
        fault_s=0.0,
        settle_timeout_s=args.settle_timeout or chaos.default_settle_timeout_s(orders),
        collation="en-US",
        admin_url=args.admin_url,
        evidence_dir=None,
    )
    return options, args.mode, args.backlog_age


def main(argv: Sequence[str] | None = None) -> int:
    options, mode, backlog_age = parse_arguments(argv)
    return chaos_verdict.exit_code_of(
        f"chaos {mode}",
        lambda: run_backlog(options, backlog_age) if mode == "backlog" else run_outage(options),
        lambda result: report(result, json_output=options.json_output),
    )


if __name__ == "__main__":
    sys.exit(main())

"""What both fault suites (``chaos``, ``chaos_partition``) do with a run that has calmed down:
read the snapshot, make the assertions they share, save the evidence, and report the verdict
(the assertion table, the summary line or the JSON)."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from stock_sync.adapters.db import Database
from stock_sync.services.queries import operation_details
from stock_sync_dev import cli_args
from stock_sync_dev.bench.harness import say
from stock_sync_dev.chaos_checks import (
    Assertion,
    Calm,
    Snapshot,
    cancelled_orders_restored,
    completed_orders_synced_once,
    every_operation_terminal,
    failures_by_design,
    ledger_sums_to_level,
    listed,
    no_deadlocks,
    one_deduction_per_order,
    read_deadlocks,
    read_snapshot,
    reconciliation_clean,
    stock_levels_as_expected,
)
from stock_sync_dev.chaos_faults import HarnessError, ProducerTally
from stock_sync_dev.chaos_scenario import Scenario

EXIT_OK, EXIT_VIOLATED, EXIT_HARNESS_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 130


class Marketplace(Protocol):
    """The fake microservice of a run: in this process, or in a host's namespace."""

    def order(self, order_id: str) -> dict[str, Any]: ...

    def fulfillment_requests(self) -> list[dict[str, Any]]: ...


class SuiteOptions(Protocol):
    @property
    def seed(self) -> int: ...

    @property
    def json_output(self) -> bool: ...


@dataclass
class SuiteReport:
    """What every suite's run did and found; whether every assertion held, the summary line
    and the JSON document. Each suite adds its own figures (and its own ``Options``)."""

    SUITE: ClassVar[str]
    options: SuiteOptions
    calm: Calm
    # Exits the suite did not cause (restarted, as the compose file's restart policy would).
    process_exits: list[str]
    lost_answers: int
    tally: ProducerTally
    statuses: dict[str, int]
    errors_by_type: dict[str, int]
    assertions: list[Assertion]
    total_s: float

    def figures(self) -> dict[str, Any]:
        """The summary's figures, in the order the line shows them."""
        raise NotImplementedError

    def details(self) -> dict[str, Any]:
        """The suite's own entries of the JSON document, after ``calm_reached``."""
        raise NotImplementedError

    @property
    def ok(self) -> bool:
        return all(assertion.ok for assertion in self.assertions)

    @property
    def violated(self) -> list[str]:
        return [assertion.name for assertion in self.assertions if not assertion.ok]

    def summary_line(self) -> str:
        figures = " ".join(f"{name}={value}" for name, value in self.figures().items())
        verdict = "OK" if self.ok else "FAILED (" + ", ".join(self.violated) + ")"
        return f"{self.SUITE}: {figures} : {verdict}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.figures(),
            "ok": self.ok,
            "seed": self.options.seed,
            "calm_reached": self.calm.reached,
            **self.details(),
            "process_exit_details": self.process_exits,
            "errors_by_type": self.errors_by_type,
            "violated": self.violated,
            "assertions": [assertion.to_dict() for assertion in self.assertions],
            "summary": self.summary_line(),
        }


class Verdict(Protocol):
    @property
    def ok(self) -> bool: ...


V = TypeVar("V", bound=Verdict)


def exit_code_of(suite: str, run: Callable[[], V], report: Callable[[V], None]) -> int:
    """Run a suite, SIGTERM unwinding like Ctrl-C, and report it: 0 when every assertion
    held, 1 when one was violated, 2 when the harness failed, 130 when interrupted."""
    signal.signal(signal.SIGTERM, cli_args.interrupt_on_sigterm)
    try:
        result = run()
    except KeyboardInterrupt:
        say("interrupted; everything the fault suite started was stopped")
        return EXIT_INTERRUPTED
    except HarnessError as error:
        say(f"{suite}: the harness failed: {error}")
        return EXIT_HARNESS_FAILED
    report(result)
    return EXIT_OK if result.ok else EXIT_VIOLATED


def retry_budgets(settings: dict[str, str]) -> dict[str, int]:
    """Each stage's retry budget, from a suite's settings (``MAX_RETRIES_<STAGE>``)."""
    return {
        stage: int(settings[f"MAX_RETRIES_{stage.upper()}"])
        for stage in ("pending", "processing", "deduction", "stock_deducted", "rollback")
    }


def take_snapshot(database: Database, scenario: Scenario, fake: Marketplace) -> Snapshot:
    fulfillment = {
        order.order_id: str(fake.order(order.order_id)["fulfillment_status"])
        for order in scenario.orders
    }
    return read_snapshot(database, scenario.initial_stock, fulfillment, fake.fulfillment_requests())


def shared_assertions(
    snapshot: Snapshot,
    database: Database,
    scenario: Scenario,
    retry_budgets: dict[str, int],
    variables: dict[str, str],
    log_paths: Sequence[Path],
    producer_errors: Sequence[str],
    producer_calls_clean: str,
) -> list[Assertion]:
    """The assertions of both suites, in the order their reports list them;
    ``producer_calls_clean`` says which producer errors were expected."""
    restored, rollback_failed = cancelled_orders_restored(snapshot, database)
    return [
        every_operation_terminal(snapshot),
        stock_levels_as_expected(snapshot),
        ledger_sums_to_level(snapshot),
        restored,
        rollback_failed,
        completed_orders_synced_once(snapshot),
        failures_by_design(snapshot, database, scenario.short_order_ids(), retry_budgets),
        reconciliation_clean(variables),
        one_deduction_per_order(database),
        no_deadlocks(read_deadlocks(database), log_paths, producer_errors),
        listed("producer_calls_clean", producer_calls_clean, producer_errors),
    ]


def save_operations_and_logs(
    database: Database, assertions: Sequence[Assertion], log_paths: Sequence[Path], folder: Path
) -> None:
    """``stock-sync show --json`` of every example operation, the assertions and the logs."""
    folder.mkdir(parents=True, exist_ok=True)
    for assertion in assertions:
        for operation_id in assertion.example_operations(limit=len(assertion.found)):
            with database.transaction() as session:
                details = operation_details(session, operation_id)
            (folder / f"show-{operation_id}.json").write_text(
                json.dumps(details, indent=2, default=str)
            )
    (folder / "assertions.json").write_text(
        json.dumps([assertion.to_dict() for assertion in assertions], indent=2)
    )
    for log_path in log_paths:
        shutil.copy(log_path, folder / log_path.name)
    say(f"evidence saved in {folder}")


def say_assertions(assertions: Sequence[Assertion]) -> None:
    for assertion in assertions:
        verdict = "ok" if assertion.ok else f"VIOLATED ({len(assertion.found)})"
        say(f"  {assertion.name:<32} {verdict}")


def say_errors(errors_by_type: dict[str, int]) -> None:
    errors = ", ".join(f"{k}={v}" for k, v in errors_by_type.items())
    say(f"  errors recorded on operations: {errors or 'none'}")


def print_result(result: SuiteReport) -> None:
    """The summary line on stdout; with ``--json`` on stderr, and the JSON on stdout."""
    if result.options.json_output:
        say(result.summary_line())
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.summary_line(), flush=True)

"""What ``python -m stock_sync_dev.chaos`` checks once the faults stopped and the run calmed
down.

Each assertion has a name, says what must hold, and collects its violations as one-line
examples (with the operation ids worth a timeline). The data is read once, after every Celery
process was stopped, so nothing moves while it is judged.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import (
    OperationEvent,
    PendingStockOperation,
    StockLevel,
    StockMovement,
)
from stock_sync.domain.statuses import TERMINAL_STATUSES, OperationStatus, OperationType
from stock_sync.domain.stock import MovementReason
from stock_sync_dev import processes
from stock_sync_dev.bench.harness import process_environment, say

S = OperationStatus
TERMINAL = frozenset(status.value for status in TERMINAL_STATUSES)
ORDER_DEDUCTION = OperationType.ORDER_DEDUCTION.value
MICROSERVICE_ROLLBACK = OperationType.MICROSERVICE_ROLLBACK.value
STATUS_BEFORE_SYNC = "NEW"  # every order of the run starts at NEW on the marketplace
SYNCED = "PROCESSING"
MAX_EXAMPLES = 8
PROGRESS_EVERY_S = 5.0
POLL_S = 1.0


# --- waiting for calm -------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    deductions_finished: int
    deductions: int
    rollbacks_finished: int
    rollbacks: int

    @property
    def calm(self) -> bool:
        return (
            self.deductions_finished == self.deductions
            and self.rollbacks_finished == self.rollbacks
        )

    def line(self) -> str:
        return (
            f"    operations finished: {self.deductions_finished}/{self.deductions}, "
            f"microservice rollbacks finished: {self.rollbacks_finished}/{self.rollbacks}"
        )


def read_progress(database: Database) -> Progress:
    op = PendingStockOperation
    finished = func.count().filter(op.status.in_(sorted(TERMINAL)))
    with database.transaction() as session:
        rows = session.execute(
            select(op.operation_type, func.count(), finished)
            .where(op.operation_type.in_([ORDER_DEDUCTION, MICROSERVICE_ROLLBACK]))
            .group_by(op.operation_type)
        )
        counts = {kind: (int(total), int(done)) for kind, total, done in rows}
    deductions, deductions_done = counts.get(ORDER_DEDUCTION, (0, 0))
    rollbacks, rollbacks_done = counts.get(MICROSERVICE_ROLLBACK, (0, 0))
    return Progress(deductions_done, deductions, rollbacks_done, rollbacks)


@dataclass(frozen=True)
class Calm:
    reached: bool
    seconds: float
    progress: Progress


def wait_for_calm(
    database: Database, timeout_s: float, on_poll: Callable[[], None] = lambda: None
) -> Calm:
    """Poll until every order deduction and microservice rollback is terminal, printing a
    progress line every few seconds; gives up after ``timeout_s``."""
    started = time.monotonic()
    last_line = 0.0
    while True:
        on_poll()
        progress = read_progress(database)
        elapsed = time.monotonic() - started
        if progress.calm or elapsed > timeout_s:
            say(f"{progress.line()} ({elapsed:.0f} s)")
            return Calm(progress.calm, elapsed, progress)
        if elapsed - last_line >= PROGRESS_EVERY_S:
            last_line = elapsed
            say(f"{progress.line()} ({elapsed:.0f} s)")
        time.sleep(POLL_S)


# --- the snapshot the assertions judge ------------------------------------------------------


@dataclass(frozen=True)
class OperationRow:
    id: uuid.UUID
    order_id: str
    account_name: str | None
    operation_type: str
    status: str
    parent_id: uuid.UUID | None
    line_items: tuple[tuple[str, int], ...]  # (sku, quantity)
    retry_count: int
    deduction_retry_count: int
    failed_stage: str | None  # the stage whose retry limit failed it
    last_error_type: str | None
    last_error: str | None
    has_deductions: bool

    def describe(self) -> str:
        error = f", last error {self.last_error[:120]}" if self.last_error else ""
        return (
            f"operation {self.id} ({self.operation_type}, order {self.order_id}, account "
            f"{self.account_name or '-'}) is {self.status}, {self.retry_count} retries{error}"
        )


@dataclass(frozen=True)
class Snapshot:
    """The database and the fake microservice as the run left them."""

    operations: tuple[OperationRow, ...]
    levels: Mapping[str, int]
    ledger: Mapping[str, int]
    initial_stock: Mapping[str, int]
    fulfillment: Mapping[str, str]  # order id -> fulfillment status on the marketplace
    puts: tuple[Mapping[str, Any], ...]  # every PUT the fake received, oldest first

    def deductions(self, status: OperationStatus | None = None) -> list[OperationRow]:
        return [
            row
            for row in self.operations
            if row.operation_type == ORDER_DEDUCTION and (status is None or row.status == status)
        ]

    def rollbacks_of(self, operation_id: uuid.UUID) -> list[OperationRow]:
        return [
            row
            for row in self.operations
            if row.operation_type == MICROSERVICE_ROLLBACK and row.parent_id == operation_id
        ]

    def other_deductions(self, row: OperationRow) -> int:
        """How many other deduction operations the row's order has (their effects mix)."""
        return sum(
            1
            for other in self.deductions()
            if other.order_id == row.order_id and other.id != row.id
        )

    def sharing_note(self, row: OperationRow) -> str:
        others = self.other_deductions(row)
        return f" (the order has {others} other deduction operation(s))" if others else ""

    def applied_puts(self, order_id: str) -> list[str]:
        """The fulfillment statuses the marketplace applied for the order, in order."""
        return [
            str(put["status"])
            for put in self.puts
            if put["order_id"] == order_id and put["outcome"] == "applied"
        ]


def _line_items(raw: object) -> tuple[tuple[str, int], ...]:
    if not isinstance(raw, list):
        return ()
    return tuple((str(item["sku"]), int(item["quantity"])) for item in raw)


def read_snapshot(
    database: Database,
    initial_stock: Mapping[str, int],
    fulfillment: Mapping[str, str],
    puts: Sequence[Mapping[str, Any]],
) -> Snapshot:
    op, movement = PendingStockOperation, StockMovement
    with database.transaction() as session:
        handed_over = select(movement.reverses_movement_id).where(
            movement.reason == MovementReason.HANDOVER.value,
            movement.reverses_movement_id.is_not(None),
        )
        deducted = set(  # deductions still their operation's (a retry takes one over)
            session.scalars(
                select(movement.operation_id)
                .where(
                    movement.reason == MovementReason.DEDUCTION.value,
                    movement.id.not_in(handed_over),
                )
                .distinct()
            )
        )
        operations = tuple(
            OperationRow(
                id=row.id,
                order_id=row.order_id,
                account_name=row.account_name,
                operation_type=row.operation_type,
                status=row.status,
                parent_id=row.parent_operation_id,
                line_items=_line_items(row.line_items),
                retry_count=row.retry_count,
                deduction_retry_count=row.deduction_retry_count,
                failed_stage=row.failed_stage,
                last_error_type=row.last_error_type,
                last_error=row.last_error,
                has_deductions=row.id in deducted,
            )
            for row in session.scalars(select(op).order_by(op.created_at))
        )
        levels = {
            sku: int(quantity)
            for sku, quantity in session.execute(select(StockLevel.sku, StockLevel.quantity))
        }
        ledger = {
            sku: int(total)
            for sku, total in session.execute(
                select(movement.sku, func.sum(movement.delta)).group_by(movement.sku)
            )
        }
    return Snapshot(operations, levels, ledger, dict(initial_stock), dict(fulfillment), tuple(puts))


# --- assertions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    message: str
    operation_id: uuid.UUID | None = None
    # The order has several deduction operations: this may be a consequence of that defect.
    on_duplicated_order: bool = False


@dataclass
class Assertion:
    name: str
    description: str
    found: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.found

    def violated(
        self,
        message: str,
        operation_id: uuid.UUID | None = None,
        *,
        on_duplicated_order: bool = False,
    ) -> None:
        self.found.append(Violation(message, operation_id, on_duplicated_order))

    def examples(self) -> list[Violation]:
        """The violations, those not explained by a duplicated order first."""
        return sorted(self.found, key=lambda violation: violation.on_duplicated_order)

    def example_operations(self, limit: int = MAX_EXAMPLES) -> list[uuid.UUID]:
        found = [v.operation_id for v in self.examples() if v.operation_id is not None]
        return list(dict.fromkeys(found))[:limit]

    @property
    def on_duplicated_orders(self) -> int:
        return sum(1 for violation in self.found if violation.on_duplicated_order)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "ok": self.ok,
            "violations": len(self.found),
            "on_duplicated_orders": self.on_duplicated_orders,
            "examples": [violation.message for violation in self.examples()[:MAX_EXAMPLES]],
            "example_operations": [str(i) for i in self.example_operations()],
        }


def every_operation_terminal(snapshot: Snapshot) -> Assertion:
    check = Assertion(
        "every_operation_terminal",
        "every operation (order deductions and adjustments) is completed, failed or cancelled",
    )
    for row in snapshot.operations:
        if row.status not in TERMINAL:
            check.violated(row.describe(), row.id)
    return check


def _quantities(rows: Iterable[OperationRow]) -> Counter[str]:
    taken: Counter[str] = Counter()
    for row in rows:
        for sku, quantity in row.line_items:
            taken[sku] += quantity
    return taken


def stock_levels_as_expected(snapshot: Snapshot) -> Assertion:
    check = Assertion(
        "stock_levels_as_expected",
        "each level == initial - lines of COMPLETED operations - lines of FAILED operations "
        "that had deducted (cancelled ones were restored)",
    )
    completed = _quantities(snapshot.deductions(S.COMPLETED))
    failed_deducted = _quantities(
        row for row in snapshot.deductions(S.FAILED) if row.has_deductions
    )
    for sku, initial in sorted(snapshot.initial_stock.items()):
        expected = initial - completed[sku] - failed_deducted[sku]
        level = snapshot.levels.get(sku)
        if level != expected:
            check.violated(
                f"{sku}: level {level}, expected {expected} (initial {initial}, completed "
                f"took {completed[sku]}, failed-after-deduction took {failed_deducted[sku]})"
            )
    return check


def ledger_sums_to_level(snapshot: Snapshot) -> Assertion:
    check = Assertion("ledger_sums_to_level", "every stock level == the sum of its movements")
    for sku, level in sorted(snapshot.levels.items()):
        total = int(snapshot.ledger.get(sku) or 0)
        if level != total:
            check.violated(f"{sku}: level {level}, ledger sums to {total}")
    return check


def _cancelled_from(database: Database, operation_id: uuid.UUID) -> str:
    event = OperationEvent
    with database.transaction() as session:
        found = session.scalar(
            select(event.from_status)
            .where(event.operation_id == operation_id, event.to_status == S.CANCELLED.value)
            .order_by(event.id.desc())
            .limit(1)
        )
    return found or "?"


def cancelled_orders_restored(
    snapshot: Snapshot, database: Database
) -> tuple[Assertion, Assertion]:
    """Cancelled orders show their pre-sync status again; those whose microservice rollback
    ended FAILED are reported by a second assertion instead of passing silently."""
    restored = Assertion(
        "cancelled_orders_back_to_new",
        f"every CANCELLED order shows the fulfillment status it had before the sync "
        f"({STATUS_BEFORE_SYNC}) on the marketplace",
    )
    rollback_failed = Assertion(
        "cancelled_rollbacks_not_failed",
        "no cancelled order's microservice rollback ended FAILED (the marketplace would still "
        "show it as synced)",
    )
    for row in snapshot.deductions(S.CANCELLED):
        rollbacks = snapshot.rollbacks_of(row.id)
        status = snapshot.fulfillment.get(row.order_id)
        if any(rollback.status == S.FAILED.value for rollback in rollbacks):
            rollback_failed.violated(
                f"order {row.order_id}: operation {row.id} cancelled, its rollback FAILED; "
                f"marketplace shows {status}",
                row.id,
            )
            continue
        if status != STATUS_BEFORE_SYNC:
            rollback_states = ", ".join(r.status for r in rollbacks) or "none"
            restored.violated(
                f"order {row.order_id}: operation {row.id} cancelled from "
                f"{_cancelled_from(database, row.id)}, marketplace shows {status}; applied "
                f"PUTs {snapshot.applied_puts(row.order_id)}; microservice rollbacks: "
                f"{rollback_states}{snapshot.sharing_note(row)}",
                row.id,
                on_duplicated_order=bool(snapshot.other_deductions(row)),
            )
    return restored, rollback_failed


def completed_orders_synced_once(snapshot: Snapshot) -> Assertion:
    check = Assertion(
        "completed_orders_synced_once",
        f"every COMPLETED order shows {SYNCED} on the marketplace, set by exactly one "
        f"applied PUT of {SYNCED}",
    )
    for row in snapshot.deductions(S.COMPLETED):
        status = snapshot.fulfillment.get(row.order_id)
        applied = snapshot.applied_puts(row.order_id)
        if status != SYNCED or applied.count(SYNCED) != 1:
            check.violated(
                f"order {row.order_id}: operation {row.id} completed, marketplace shows "
                f"{status}; applied PUTs {applied}{snapshot.sharing_note(row)}",
                row.id,
                on_duplicated_order=bool(snapshot.other_deductions(row)),
            )
    return check


def _failed_from(database: Database, operation_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The status each operation was in when it moved to FAILED."""
    event = OperationEvent
    with database.transaction() as session:
        rows = session.execute(
            select(event.operation_id, event.from_status).where(
                event.operation_id.in_(operation_ids), event.to_status == S.FAILED.value
            )
        )
        return {operation_id: str(status) for operation_id, status in rows}


def ran_short(row: OperationRow) -> bool:
    """The operation's last error was a shortage (an unknown SKU never happens here)."""
    return row.last_error_type == "InsufficientStock"


def spent_budget(row: OperationRow, failed_from: str) -> tuple[str, int]:
    """The budget a FAILED operation spent and its count: each stage has its own; in
    PROCESSING deduct_stock counts apart from validate_stock (an operation that went back
    from a short deduction to validation has both counts: the stage that failed it decides)."""
    if row.operation_type == MICROSERVICE_ROLLBACK:
        return "rollback", row.retry_count
    deduction_failed = row.failed_stage == "deduct_stock" or (
        row.failed_stage is None and row.deduction_retry_count
    )
    if failed_from == S.PROCESSING.value and deduction_failed:
        return "deduction", row.deduction_retry_count
    return failed_from, row.retry_count


def failures_by_design(
    snapshot: Snapshot,
    database: Database,
    short_orders: Collection[str],
    budgets: Mapping[str, int],
) -> Assertion:
    """``short_orders``: the orders the scenario made ask for more than exists; ``budgets``:
    retries per budget (pending, processing, deduction, stock_deducted, rollback)."""
    check = Assertion(
        "failures_by_design",
        "every FAILED operation spent the retry budget of the stage it failed in (one more when "
        "the stuck sweep ran its lost last retry), and "
        "every FAILED order deduction is one designed to run short (a greedy order or a scarce "
        "SKU) that failed for want of stock",
    )
    failed = [row for row in snapshot.operations if row.status == S.FAILED.value]
    failed_from = _failed_from(database, [row.id for row in failed])
    for row in failed:
        stage = failed_from.get(row.id, "?")
        budget_key, spent = spent_budget(row, stage)
        budget = budgets.get(budget_key)
        if budget is None or spent not in (budget, budget + 1):
            check.violated(
                f"{row.describe()}: failed from {stage} after {spent} retries, "
                f"its budget ({budget_key}) is {budget}",
                row.id,
            )
        elif row.operation_type == ORDER_DEDUCTION and not (
            row.order_id in short_orders and ran_short(row)
        ):
            check.violated(
                f"{row.describe()}: failed from {stage} on {row.last_error_type}, but the order "
                f"{'may' if row.order_id in short_orders else 'can never'} run short"
                f"{snapshot.sharing_note(row)}",
                row.id,
                on_duplicated_order=bool(snapshot.other_deductions(row)),
            )
    return check


def one_deduction_per_order(database: Database) -> Assertion:
    check = Assertion(
        "one_deduction_per_order",
        "no order has two submitted order-deduction operations (a retry's successor continues "
        "its order's one line)",
    )
    op = PendingStockOperation
    with database.transaction() as session:
        doubled = list(
            session.scalars(
                select(op.order_id)
                .where(op.operation_type == ORDER_DEDUCTION, op.predecessor_operation_id.is_(None))
                .group_by(op.order_id)
                .having(func.count() > 1)
                .order_by(op.order_id)
            )
        )
        for order_id in doubled:
            rows = session.execute(
                select(op.id, op.account_name, op.status)
                .where(
                    op.order_id == order_id,
                    op.operation_type == ORDER_DEDUCTION,
                    op.predecessor_operation_id.is_(None),
                )
                .order_by(op.created_at)
            ).all()
            listed = "; ".join(f"{i} (account {a or '-'}, {s})" for i, a, s in rows)
            check.violated(f"order {order_id}: {len(rows)} operations: {listed}", rows[0][0])
    return check


def reconciliation_clean(variables: Mapping[str, str]) -> Assertion:
    """``stock-sync check --json`` as an operator would run it, with the run's settings."""
    check = Assertion("reconciliation_clean", "`stock-sync check` exits 0 (everything reconciles)")
    result = processes.stock_sync(["check", "--json"], process_environment(variables), 300)
    if result.returncode == 0:
        return check
    try:
        mismatches = json.loads(result.stdout)["mismatches"]
    except (ValueError, KeyError, TypeError):
        check.violated(f"exit {result.returncode}: {(result.stderr or result.stdout)[-500:]}")
        return check
    for mismatch in mismatches:
        subject = mismatch["subject"]
        check.violated(f"{mismatch['check']}: {mismatch['message']}", _as_uuid(subject))
    return check


def _as_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def read_deadlocks(database: Database) -> int:
    """PostgreSQL's count of deadlocks it broke in this database (stats of ended sessions)."""
    with database.engine.connect() as connection:
        value = connection.execute(
            text("select deadlocks from pg_stat_database where datname = current_database()")
        ).scalar()
    return int(value or 0)


def no_deadlocks(
    deadlocks: int, log_paths: Sequence[Path], producer_errors: Sequence[str]
) -> Assertion:
    """One violation per deadlock PostgreSQL broke, each named by its victim where known: a
    worker's stage (from its log) or a producer call of the suite (from its errors)."""
    check = Assertion(
        "no_deadlocks",
        "PostgreSQL broke no deadlock in the run's database (pg_stat_database.deadlocks): "
        "one lock order everywhere",
    )
    victims = _log_lines_with(log_paths, "deadlock detected", deadlocks)
    victims += [error for error in producer_errors if "DeadlockDetected" in error]
    for index in range(deadlocks):
        found = victims[index] if index < len(victims) else "victim not identified"
        check.violated(f"deadlock {index + 1} of {deadlocks}: {found}")
    return check


def _log_lines_with(paths: Sequence[Path], needle: str, limit: int) -> list[str]:
    """Up to ``limit`` log records containing ``needle``, one line each and one per task (a
    stage logs an unexpected error twice: the record and its traceback)."""
    found: dict[str, str] = {}
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if needle in line and len(found) < limit:
                subject, detail = _log_summary(line)
                found.setdefault(subject, f"{path.name}: {subject}: {detail}")
    return list(found.values())


def _log_summary(line: str) -> tuple[str, str]:
    """A JSON log record reduced to what it is about (operation, stage, task) and the first
    line of its error."""
    try:
        record = json.loads(line)
    except ValueError:
        return line[:100], line[100:300]
    subject = (
        f"operation {record.get('operation_id')} stage {record.get('stage')} "
        f"({record.get('task_name')})"
    )
    detail = str(record.get("exc_info") or record.get("message") or "")
    first = next((part for part in detail.splitlines() if "DeadlockDetected" in part), "")
    return subject, (first.strip() or detail)[:300]


def listed(name: str, description: str, problems: Sequence[str]) -> Assertion:
    check = Assertion(name, description)
    for problem in problems:
        check.violated(problem)
    return check


def lost_answers(puts: Sequence[Mapping[str, Any]]) -> int:
    """PUTs that took effect and were sent again with the same Idempotency-Key: the sender
    never learnt they had landed (answered after its timeout, a 502 or a dropped connection
    after applying, or its worker killed mid-call). A lost answer whose operation was
    cancelled before the retry is not counted: nobody sent it again."""
    outcomes: defaultdict[str, set[str]] = defaultdict(set)
    for put in puts:
        if put["idempotency_key"]:
            outcomes[str(put["idempotency_key"])].add(str(put["outcome"]))
    return sum(1 for seen in outcomes.values() if {"applied", "replayed"} <= seen)


def errors_by_type(database: Database) -> dict[str, int]:
    """How often each error type was recorded on an operation (retries and failures)."""
    error_type = OperationEvent.error_type
    return dict(event_counts(database, error_type, error_type.is_not(None)))


def event_counts(database: Database, column: Any, condition: Any) -> list[tuple[str, int]]:
    """How many operation events matching ``condition`` have each value of ``column``, the
    most frequent first."""
    with database.transaction() as session:
        rows = session.execute(
            select(column, func.count())
            .where(condition)
            .group_by(column)
            .order_by(func.count().desc())
        )
        return [(str(value), int(count)) for value, count in rows]

"""Reconciliation: prove the stock ledger and the operations agree, or list what does not.

Checks (each mismatch names what is wrong):
- every stock level equals the sum of its ledger movements, and none is negative;
- every COMPLETED or STOCK_DEDUCTED order deduction (and a FAILED one that was deducted)
  has exactly one deduction row per line item;
- every CANCELLED order deduction that was deducted has each deduction restored;
- no PENDING or PROCESSING operation has deduction rows (it cannot have deducted yet).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import PendingStockOperation, StockLevel, StockMovement
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.domain.stock import MovementReason

S = OperationStatus
BATCH = 1000


@dataclass(frozen=True)
class Mismatch:
    check: str
    subject: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"check": self.check, "subject": self.subject, "message": self.message}


@dataclass
class ReconciliationReport:
    stock_levels_checked: int = 0
    operations_checked: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "stock_levels_checked": self.stock_levels_checked,
            "operations_checked": self.operations_checked,
            "mismatches": [m.to_dict() for m in self.mismatches],
        }


def reconcile_database(database: Database) -> ReconciliationReport:
    """Every check, read in one snapshot: what ``stock-sync check`` and the daily task run."""
    with database.snapshot() as session:
        return reconcile(session)


def reconcile(session: Session) -> ReconciliationReport:
    """Run every check; read-only.

    Give it a :meth:`Database.snapshot` session (:func:`reconcile_database` does): the checks
    read levels, operations and their movements in several statements, and under traffic a
    plain transaction would see an operation before its deduction committed and the deduction
    after it, a false mismatch.
    """
    report = ReconciliationReport()
    _check_levels(session, report)
    _check_operations(session, report)
    return report


def _check_levels(session: Session, report: ReconciliationReport) -> None:
    ledger = (
        select(StockMovement.sku, func.sum(StockMovement.delta).label("total"))
        .group_by(StockMovement.sku)
        .subquery()
    )
    rows = session.execute(
        select(StockLevel.sku, StockLevel.quantity, func.coalesce(ledger.c.total, 0)).outerjoin(
            ledger, ledger.c.sku == StockLevel.sku
        )
    )
    for sku, quantity, total in rows:
        report.stock_levels_checked += 1
        if quantity < 0:
            report.mismatches.append(Mismatch("negative_stock", sku, f"{sku} is at {quantity}"))
        if quantity != total:
            report.mismatches.append(
                Mismatch(
                    "ledger_sum", sku, f"{sku} is at {quantity} but its ledger sums to {total}"
                )
            )


def _check_operations(session: Session, report: ReconciliationReport) -> None:
    op = PendingStockOperation
    statement = (
        select(op)
        .where(op.operation_type == OperationType.ORDER_DEDUCTION.value)
        .execution_options(yield_per=BATCH)
    )
    for operations in session.scalars(statement).partitions(BATCH):
        report.operations_checked += len(operations)
        movements = _movements_by_operation(session, [o.id for o in operations])
        for operation in operations:
            _check_operation(operation, movements.get(str(operation.id), {}), report)


def _movements_by_operation(
    session: Session, operation_ids: list[Any]
) -> dict[str, dict[str, list[tuple[str, bool]]]]:
    """operation id -> line item id -> [(reason, restored?)] for its deduction rows."""
    restoration = aliased(StockMovement)
    rows = session.execute(
        select(StockMovement.operation_id, StockMovement.line_item_id, restoration.id)
        .outerjoin(restoration, restoration.reverses_movement_id == StockMovement.id)
        .where(
            StockMovement.operation_id.in_(operation_ids),
            StockMovement.reason == MovementReason.DEDUCTION.value,
        )
    )
    found: dict[str, dict[str, list[tuple[str, bool]]]] = defaultdict(lambda: defaultdict(list))
    for operation_id, line_item_id, restored_by in rows:
        found[str(operation_id)][str(line_item_id)].append(("deduction", restored_by is not None))
    return found


def _check_operation(
    operation: PendingStockOperation,
    deductions: dict[str, list[tuple[str, bool]]],
    report: ReconciliationReport,
) -> None:
    status = operation.status_enum
    subject = str(operation.id)
    lines = {str(item["id"]) for item in operation.line_items or []}
    if status in (S.PENDING, S.PROCESSING) and deductions:
        report.mismatches.append(
            Mismatch("early_deduction", subject, f"{status.value} operation has deduction rows")
        )
        return
    must_be_deducted = status in (S.STOCK_DEDUCTED, S.COMPLETED) or (
        status is S.FAILED and bool(deductions)
    )
    if must_be_deducted:
        for line in sorted(lines):
            count = len(deductions.get(line, []))
            if count != 1:
                report.mismatches.append(
                    Mismatch(
                        "deduction_per_line",
                        subject,
                        f"{status.value} operation has {count} deductions for line {line}",
                    )
                )
        for line in sorted(set(deductions) - lines):
            report.mismatches.append(
                Mismatch("deduction_per_line", subject, f"deduction for unknown line {line}")
            )
    if status is S.CANCELLED:
        for line, rows in sorted(deductions.items()):
            if not all(restored for _reason, restored in rows):
                report.mismatches.append(
                    Mismatch(
                        "cancelled_not_restored",
                        subject,
                        f"cancelled operation's deduction of line {line} was never restored",
                    )
                )

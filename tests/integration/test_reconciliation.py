"""`stock-sync check`: the ledger, the stock levels and the operations agree, or it says where."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, text
from sqlalchemy.orm import Session

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import PendingStockOperation, StockMovement
from stock_sync.adapters.stock_ledger import deduct_for_operation, set_stock
from stock_sync.producer import request_cancellation, submit_operation
from stock_sync.services import reconciliation
from stock_sync.services.operations import line_items_of, load_operation
from stock_sync.services.reconciliation import reconcile, reconcile_database
from tests.support import Pipeline, insert_operation, order

CLI = str(Path(sys.executable).with_name("stock-sync"))


def check(database: Database) -> list[tuple[str, str]]:
    with database.transaction() as session:
        return [(m.check, m.subject) for m in reconcile(session).mismatches]


def run_check() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "check", "--json"], capture_output=True, text=True, env=dict(os.environ), timeout=60
    )


def settled_operations(pipeline: Pipeline) -> tuple[uuid.UUID, uuid.UUID]:
    pipeline.set_stock(**{"SKU-Q": 10})
    pipeline.fake.add_order(order("kept", ("SKU-Q", 2)))
    pipeline.fake.add_order(order("returned", ("SKU-Q", 3)))
    kept, returned = submit_operation("kept"), submit_operation("returned")
    pipeline.wait_for([kept, returned])
    request_cancellation(returned, "tester", "return")
    return kept, returned


def test_a_healthy_ledger_reconciles(pipeline: Pipeline) -> None:
    settled_operations(pipeline)
    assert check(pipeline.database) == []
    result = run_check()
    assert result.returncode == 0
    payload = json.loads(result.stdout)
    assert payload["ok"] is True and payload["operations_checked"] == 2


def test_a_level_changed_behind_the_ledgers_back_is_reported(pipeline: Pipeline) -> None:
    settled_operations(pipeline)
    with pipeline.database.transaction() as session:
        session.execute(text("update stock_levels set quantity = quantity + 1 where sku = 'SKU-Q'"))
    assert check(pipeline.database) == [("ledger_sum", "SKU-Q")]
    result = run_check()
    assert result.returncode == 1
    assert (
        json.loads(result.stdout)["mismatches"][0]["message"]
        == "SKU-Q is at 9 but its ledger sums to 8"
    )


def test_a_completed_operation_without_its_deduction_is_reported(pipeline: Pipeline) -> None:
    kept, _ = settled_operations(pipeline)
    with pipeline.database.transaction() as session:
        session.execute(delete(StockMovement).where(StockMovement.operation_id == kept))
        session.execute(text("update stock_levels set quantity = quantity + 2 where sku = 'SKU-Q'"))
    assert check(pipeline.database) == [("deduction_per_line", str(kept))]


def test_a_cancelled_operation_whose_stock_never_came_back_is_reported(pipeline: Pipeline) -> None:
    _, returned = settled_operations(pipeline)
    with pipeline.database.transaction() as session:
        session.execute(delete(StockMovement).where(StockMovement.reason == "restoration"))
        session.execute(text("update stock_levels set quantity = quantity - 3 where sku = 'SKU-Q'"))
    assert check(pipeline.database) == [("cancelled_not_restored", str(returned))]
    human = subprocess.run(
        [CLI, "check"], capture_output=True, text=True, env=dict(os.environ), timeout=60
    )
    assert human.returncode == 1 and "cancelled_not_restored" in human.stdout


def test_an_operation_deducted_before_its_time_is_reported(pipeline: Pipeline) -> None:
    kept, _ = settled_operations(pipeline)
    with pipeline.database.transaction() as session:
        session.get(PendingStockOperation, kept).status = "processing"  # type: ignore[union-attr]
    assert check(pipeline.database) == [("early_deduction", str(kept))]


def test_a_deduction_committed_while_the_check_runs_is_no_false_mismatch(
    clean_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    operation_id = insert_operation(clean_database, status="processing", lines=[("SKU-Q", 1)])
    with clean_database.transaction() as session:
        set_stock(session, "SKU-Q", 5)
    read_movements = reconciliation._movements_by_operation
    deducted_between: list[list[Any]] = []

    def deduct_between_the_reads(session: Session, operation_ids: list[Any]) -> Any:
        # The check has read the operation as PROCESSING; now a stage deducts and commits.
        if not deducted_between:
            with clean_database.transaction() as other:
                operation = load_operation(other, operation_id, for_update=True)
                deduct_for_operation(other, operation_id, line_items_of(operation))
                operation.status = "stock_deducted"
            deducted_between.append(list(operation_ids))
        return read_movements(session, operation_ids)

    monkeypatch.setattr(reconciliation, "_movements_by_operation", deduct_between_the_reads)

    report = reconcile_database(clean_database)

    # The deduction happened between the reads, for a check that had read this operation.
    assert deducted_between and operation_id in deducted_between[0], deducted_between
    assert report.ok, report.mismatches
    assert check(clean_database) == []  # and afterwards the deduction is seen whole

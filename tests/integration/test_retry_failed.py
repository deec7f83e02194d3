"""`stock-sync retry` and retry_operation: a FAILED operation gets a successor that starts where
it stopped, on real PostgreSQL with the in-process worker and the fake microservice."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import OperationEvent, PendingStockOperation
from stock_sync.composition import Services, build_services
from stock_sync.domain.errors import OperationNotFound, RetryRefused
from stock_sync.domain.statuses import OperationStatus
from stock_sync.entrypoints import cli_retry
from stock_sync.entrypoints.cli import cli
from stock_sync.producer import request_cancellation, retry_operation, submit_operation
from stock_sync.services.reconciliation import reconcile_database
from stock_sync.services.recovery import OperationRecoveryService
from tests.support import (
    Pipeline,
    RecordingDispatcher,
    insert_operation,
    order,
    wait_for_lock_waiters,
)

S = OperationStatus


def failed_in_validation(pipeline: Pipeline, order_id: str) -> uuid.UUID:
    """An order asking for more than the stock: validation spends its budget, FAILED."""
    pipeline.set_stock(**{"SKU-R": 1})
    pipeline.fake.add_order(order(order_id, ("SKU-R", 3)))
    operation_id = submit_operation(order_id)
    assert pipeline.wait_for([operation_id])[0].status == "failed"
    return operation_id


def failed_in_sync(pipeline: Pipeline, order_id: str) -> uuid.UUID:
    """Every sync PUT of the budget (1 + 3 retries) refused with a 503: FAILED with the stock
    deducted and the marketplace untouched; the fifth PUT would pass."""
    pipeline.set_stock(**{"SKU-R": 5})
    pipeline.fake.add_order(order(order_id, ("SKU-R", 2)), fail_puts=4)
    operation_id = submit_operation(order_id)
    assert pipeline.wait_for([operation_id])[0].status == "failed"
    assert pipeline.stock("SKU-R") == 3
    return operation_id


def count_rows(database: Database) -> tuple[int, int]:
    with database.transaction() as session:
        operations = session.scalar(select(func.count()).select_from(PendingStockOperation))
        events = session.scalar(select(func.count()).select_from(OperationEvent))
    return int(operations or 0), int(events or 0)


# --- the successor ------------------------------------------------------------------------


def test_a_failure_before_the_deduction_is_retried_from_the_load(pipeline: Pipeline) -> None:
    failed_id = failed_in_validation(pipeline, "retry-validation")
    pipeline.set_stock(**{"SKU-R": 3})  # the stock arrived

    result = retry_operation(failed_id)

    assert (result.starts_from, result.deduction_taken_over) == (S.PENDING, False)
    assert result.failed_stage == "validate_stock" and result.enqueued
    (successor,) = pipeline.wait_for([result.successor_operation_id])
    assert successor.status == "completed" and pipeline.stock("SKU-R") == 0
    assert successor.predecessor_operation_id == failed_id
    failed = pipeline.operation(failed_id)
    assert (failed.status, failed.successor_operation_id) == ("failed", successor.id)
    assert submit_operation("retry-validation") == successor.id  # the order's live operation
    assert pipeline.actions(failed_id)[-1] == "operation_retried"
    assert pipeline.actions(successor.id)[0] == "operation_created"
    assert reconcile_database(pipeline.database).ok


def test_a_failure_after_the_deduction_takes_it_over_and_goes_on_to_the_sync(
    pipeline: Pipeline,
) -> None:
    failed_id = failed_in_sync(pipeline, "retry-sync")

    result = retry_operation(failed_id)

    assert (result.starts_from, result.deduction_taken_over) == (S.STOCK_DEDUCTED, True)
    (successor,) = pipeline.wait_for([result.successor_operation_id])
    assert successor.status == "completed"
    assert pipeline.stock("SKU-R") == 3  # deducted once, by the failed one; never again
    assert pipeline.movements(failed_id) == [("SKU-R", -2, "deduction"), ("SKU-R", 2, "handover")]
    assert pipeline.movements(successor.id) == [("SKU-R", -2, "deduction")]
    assert pipeline.ledger_matches_stock("SKU-R") and reconcile_database(pipeline.database).ok
    assert pipeline.fake.order("retry-sync")["fulfillment_status"] == "PROCESSING"
    assert len(pipeline.applied_puts("retry-sync")) == 1
    moves = [(e.from_status, e.to_status) for e in pipeline.events(successor.id) if e.to_status]
    assert moves[:2] == [("pending", "processing"), ("processing", "stock_deducted")]


def test_a_successor_that_took_over_a_deduction_can_be_cancelled(pipeline: Pipeline) -> None:
    failed_id = failed_in_sync(pipeline, "retry-then-cancel")
    successor_id = retry_operation(failed_id).successor_operation_id
    pipeline.wait_for([successor_id])

    result = request_cancellation(successor_id, "ops", "customer called")

    assert result.stock_restored and pipeline.stock("SKU-R") == 5
    rollbacks = [uuid.UUID(i) for i in result.to_dict()["adjustment_operation_ids"]]
    pipeline.wait_for(rollbacks, lambda op: op.status == "completed")
    assert pipeline.fake.order("retry-then-cancel")["fulfillment_status"] == "NEW"
    assert pipeline.ledger_matches_stock("SKU-R") and reconcile_database(pipeline.database).ok


# --- refusals -----------------------------------------------------------------------------


@pytest.fixture
def recovery(pipeline_environment: str, clean_database: Database) -> Services:
    return build_services(database=clean_database, dispatcher=RecordingDispatcher())


def test_unknown_live_or_retried_operations_are_refused_and_nothing_is_written(
    recovery: Services, clean_database: Database
) -> None:
    live = insert_operation(clean_database, status=S.PROCESSING)
    retried = insert_operation(clean_database, status=S.FAILED)
    recovery.recovery.retry_operation(retried)
    before = count_rows(clean_database)

    with pytest.raises(OperationNotFound):
        recovery.recovery.retry_operation(uuid.uuid4())
    with pytest.raises(RetryRefused, match="it is processing, not failed"):
        recovery.recovery.retry_operation(live)
    with pytest.raises(RetryRefused, match="it was retried already: its successor is"):
        recovery.recovery.retry_operation(retried)
    assert count_rows(clean_database) == before


def test_two_concurrent_retries_of_one_operation_create_one_successor(
    recovery: Services, clean_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed_id = insert_operation(clean_database, status=S.FAILED)
    holding, release = threading.Event(), threading.Event()
    original = OperationRecoveryService._successor

    def successor_then_wait(self: Any, session: Any, failed: Any) -> Any:
        created = original(self, session, failed)
        holding.set()  # the first retry holds the failed row's lock, its successor unwritten
        assert release.wait(30)
        return created

    monkeypatch.setattr(OperationRecoveryService, "_successor", successor_then_wait)
    outcomes: dict[str, Any] = {}

    def first() -> None:
        outcomes["first"] = recovery.recovery.retry_operation(failed_id)

    def second() -> None:
        try:
            outcomes["second"] = recovery.recovery.retry_operation(failed_id)
        except RetryRefused as refused:
            outcomes["second"] = refused

    threads = [threading.Thread(target=first)]
    threads[0].start()
    assert holding.wait(30), "the first retry never reached its successor"
    threads.append(threading.Thread(target=second))
    threads[1].start()
    wait_for_lock_waiters(clean_database, 1)  # the second waits for the failed row's lock
    release.set()
    for thread in threads:
        thread.join(30)

    assert isinstance(outcomes["second"], RetryRefused), outcomes
    with clean_database.transaction() as session:
        successors = session.scalars(
            select(PendingStockOperation.id).where(
                PendingStockOperation.predecessor_operation_id == failed_id
            )
        ).all()
    assert successors == [outcomes["first"].successor_operation_id]


# --- the command line ---------------------------------------------------------------------


def invoke(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def test_retry_by_id_prints_the_successor_and_json(pipeline: Pipeline) -> None:
    failed_id = failed_in_validation(pipeline, "cli-retry")
    pipeline.set_stock(**{"SKU-R": 3})

    result = invoke("retry", str(failed_id), "--yes", "--json")

    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["refused"] == []
    (retried,) = payload["retried"]
    assert retried["failed_operation_id"] == str(failed_id)
    assert retried["starts_from"] == "pending" and retried["failed_stage"] == "validate_stock"
    successor_id = uuid.UUID(retried["successor_operation_id"])
    pipeline.wait_for([successor_id])
    shown = json.loads(invoke("show", str(successor_id), "--json").stdout)
    assert shown["retry_of"] == str(failed_id)
    listed = json.loads(invoke("list", "--order", "cli-retry", "--json").stdout)
    assert {row["id"]: row["retried_as"] for row in listed} == {
        str(successor_id): None,
        str(failed_id): str(successor_id),
    }
    assert f"as {str(successor_id)[:8]}" in invoke("list", "--order", "cli-retry").output


def test_retry_without_yes_asks_on_a_terminal_and_refuses_otherwise(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed_id = failed_in_validation(pipeline, "cli-confirm")
    before = count_rows(pipeline.database)

    refused = invoke("retry", str(failed_id))
    assert refused.exit_code == 1
    assert "stdin is not a terminal (pass --yes)" in refused.output
    assert count_rows(pipeline.database) == before

    monkeypatch.setattr("stock_sync.entrypoints.cli_common.stdin_is_interactive", lambda: True)
    declined = invoke("retry", str(failed_id), input="n\n")
    assert declined.exit_code == 1 and count_rows(pipeline.database) == before
    accepted = invoke("retry", str(failed_id), input="y\n")
    assert accepted.exit_code == 0 and "retried 1 operation(s)" in accepted.output


def test_retry_refusals_are_one_line_exit_1_and_write_nothing(pipeline: Pipeline) -> None:
    failed_id = failed_in_validation(pipeline, "cli-refusals")
    live = insert_operation(pipeline.database, status=S.PENDING, dispatched_at=None)
    before = count_rows(pipeline.database)
    for args, message in [
        (("retry", str(uuid.uuid4()), "--yes"), "operation not found"),
        (("retry", str(failed_id), str(live), "--yes"), "it is pending, not failed"),
        (("retry", "not-an-id", "--yes"), "not an operation id"),
    ]:
        result = invoke(*args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.output)
    assert count_rows(pipeline.database) == before
    usage = invoke("retry", "--yes")
    assert usage.exit_code == 2 and "give operation ids or --failed" in usage.output


def test_retry_failed_selects_by_stage_and_age(pipeline: Pipeline) -> None:
    in_validation = failed_in_validation(pipeline, "cli-all-1")
    in_sync = failed_in_sync(pipeline, "cli-all-2")
    pipeline.set_stock(**{"SKU-R": 10})

    only_sync = json.loads(
        invoke("retry", "--failed", "--stage", "sync_microservice", "--yes", "--json").stdout
    )
    assert [r["failed_operation_id"] for r in only_sync["retried"]] == [str(in_sync)]
    none = invoke("retry", "--failed", "--since", "1h", "--stage", "load_line_items", "--yes")
    assert none.exit_code == 0 and "no failed operation to retry" in none.output
    rest = json.loads(invoke("retry", "--failed", "--since", "1h", "--yes", "--json").stdout)
    assert [r["failed_operation_id"] for r in rest["retried"]] == [str(in_validation)]
    nothing = invoke("retry", "--failed", "--yes")
    assert nothing.exit_code == 0 and "no failed operation to retry" in nothing.output
    bad = invoke("retry", "--failed", "--since", "soon", "--yes")
    assert bad.exit_code == 2 and "not a duration" in bad.output


def test_the_retry_command_module_is_loaded_by_the_cli() -> None:
    assert cli.get_command(None, "retry") is cli_retry.retry  # type: ignore[arg-type]

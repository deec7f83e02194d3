"""The main job end to end: real worker, real Redis, real PostgreSQL, the fake over HTTP."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import pytest

from stock_sync.domain.statuses import OperationStatus
from stock_sync.producer import submit_operation
from tasks.dispatch import CeleryDispatcher
from tasks.stages import deduct_stock, sync_microservice
from tests.support import Pipeline, insert_operation, order

S = OperationStatus

HAPPY_PATH = [
    "operation_created",
    "line_items_loading",
    "line_items_loaded",
    "status_transition",
    "stock_validation_started",
    "stock_validation_passed",
    "stock_deduction_started",
    "stock_deduction_completed",
    "status_transition",
    "microservice_sync_started",
    "microservice_sync_success",
    "status_transition",
]


def test_an_order_goes_from_pending_to_completed(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-A": 5, "SKU-B": 2})
    pipeline.fake.add_order(order("order-1", ("SKU-A", 2), ("SKU-B", 1)))
    operation_id = submit_operation("order-1", "shop-1")
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "completed"
    assert pipeline.stock("SKU-A") == 3 and pipeline.stock("SKU-B") == 1
    assert pipeline.actions(operation_id) == HAPPY_PATH
    assert pipeline.logged_actions(operation_id) == HAPPY_PATH
    transitions = [
        (e.from_status, e.to_status)
        for e in pipeline.events(operation_id)
        if e.action == "status_transition"
    ]
    assert transitions == [
        ("pending", "processing"),
        ("processing", "stock_deducted"),
        ("stock_deducted", "completed"),
    ]
    assert (
        done.line_items_loaded_at
        and done.stock_deducted_at
        and done.microservice_synced_at
        and done.completed_at
    )
    assert done.fulfillment_status_before_sync == "NEW"
    (put,) = pipeline.applied_puts("order-1")
    assert put["status"] == "PROCESSING" and put["idempotency_key"].startswith(
        f"stock-sync:{operation_id}:sync:"
    )
    assert pipeline.fake.order("order-1")["fulfillment_status"] == "PROCESSING"


def retries_of(pipeline: Pipeline, operation_id: uuid.UUID) -> list[logging.LogRecord]:
    return [
        r
        for r in pipeline.log_records
        if getattr(r, "operation_id", None) == str(operation_id)
        and getattr(r, "action", None) == "retry_scheduled"
    ]


def test_an_order_paid_late_is_retried_until_ready(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-A": 1})
    operation_id = pipeline.submit(order("late", ("SKU-A", 1)), ready_after_reads=2)
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "completed"
    actions = pipeline.actions(operation_id)
    assert actions.count("retry_scheduled") == 2
    assert actions.count("line_items_load_failed") == 2
    retries = retries_of(pipeline, operation_id)
    assert [r.attempt for r in retries] == [1, 2]  # type: ignore[attr-defined]
    assert all(r.next_retry_at for r in retries)  # type: ignore[attr-defined]
    failures = [e for e in pipeline.events(operation_id) if e.action == "line_items_load_failed"]
    assert {e.error_type for e in failures} == {"OrderNotReady"}


def test_a_404_right_after_creation_is_retried(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-A": 1})
    operation_id = pipeline.submit(order("fresh", ("SKU-A", 1)), not_found_reads=1)
    assert pipeline.wait_for([operation_id])[0].status == "completed"
    assert "OrderNotFound" in {e.error_type for e in pipeline.events(operation_id)}


def test_the_account_name_is_filled_from_the_order(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-A": 1})
    operation_id = pipeline.submit(order("no-account", ("SKU-A", 1), account_name="shop-77"))
    (done,) = pipeline.wait_for([operation_id])
    assert done.account_name == "shop-77"
    actions = pipeline.actions(operation_id)
    assert actions.index("account_name_updated") < actions.index("line_items_loaded")


def test_validation_retries_until_stock_arrives(
    pipeline: Pipeline, retry_limits: Callable[..., None]
) -> None:
    retry_limits(max_retries_processing=200, retry_backoff_base_s=0.02, retry_backoff_max_s=0.05)
    pipeline.set_stock(**{"SKU-A": 0})
    operation_id = pipeline.submit(order("restock", ("SKU-A", 2)))
    pipeline.wait_for([operation_id], lambda op: op.status == "processing" and op.retry_count >= 1)
    pipeline.set_stock(**{"SKU-A": 2})
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "completed" and pipeline.stock("SKU-A") == 0
    validation = [
        r for r in pipeline.log_records if getattr(r, "action", None) == "stock_validation_failed"
    ]
    assert validation and validation[0].validation_failures == [
        {"sku": "SKU-A", "requested": 2, "available": 0}
    ]  # type: ignore[attr-defined]


def test_a_failing_sync_is_retried_and_puts_once(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-A": 1})
    operation_id = pipeline.submit(order("flaky-put", ("SKU-A", 1)), fail_puts=2)
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "completed"
    assert pipeline.actions(operation_id).count("microservice_sync_failed") == 2
    assert len(pipeline.applied_puts("flaky-put")) == 1
    assert pipeline.stock("SKU-A") == 0


def test_retries_exhausted_while_pending_end_failed(pipeline: Pipeline) -> None:
    operation_id = pipeline.submit(order("never-paid", ("SKU-A", 1)), ready_after_reads=10_000)
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "failed" and done.retry_count == 3 and done.failed_at
    assert done.last_error_type == "OrderNotReady"
    tail = pipeline.actions(operation_id)[-4:]
    assert tail == [
        "line_items_load_failed",
        "max_retries_reached",
        "operation_failed",
        "status_transition",
    ]
    assert pipeline.events(operation_id)[-1].to_status == "failed"


def test_retries_exhausted_while_processing_end_failed_with_stock_untouched(
    pipeline: Pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="stock_sync.notifications")
    pipeline.set_stock(**{"SKU-A": 1, "SKU-B": 9})
    operation_id = pipeline.submit(order("too-big", ("SKU-A", 3), ("SKU-B", 1)))
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "failed" and done.last_error_type == "InsufficientStock"
    assert (pipeline.stock("SKU-A"), pipeline.stock("SKU-B")) == (1, 9)
    assert pipeline.movements(operation_id) == []
    actions = pipeline.actions(operation_id)
    assert actions.count("stock_validation_failed") == 4  # the first try and three retries
    assert actions[-3:] == ["max_retries_reached", "operation_failed", "status_transition"]
    notified = [
        r.notification["kind"]  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "stock_sync.notifications" and r.operation_id == str(operation_id)  # type: ignore[attr-defined]
    ]
    assert notified.count("stock_validation_failed") == 4
    assert notified[-1] == "operation_failed"


def test_retries_exhausted_after_deduction_end_failed_with_stock_still_deducted(
    pipeline: Pipeline,
) -> None:
    pipeline.set_stock(**{"SKU-A": 5})
    operation_id = pipeline.submit(order("sync-down", ("SKU-A", 2)), fail_puts=10_000)
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "failed"
    assert pipeline.stock("SKU-A") == 3
    assert pipeline.movements(operation_id) == [("SKU-A", -2, "deduction")]
    final = pipeline.events(operation_id)[-1]
    assert (final.from_status, final.to_status) == ("stock_deducted", "failed")
    assert "stock stays deducted" in final.details["reason"]


def test_an_order_cancelled_upstream_is_cancelled_by_the_marketplace(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-A": 5})
    operation_id = pipeline.submit(order("gone", ("SKU-A", 2), status="CANCELLED"))
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "cancelled" and done.cancelled_by == "marketplace"
    assert pipeline.stock("SKU-A") == 5
    assert pipeline.actions(operation_id)[-3:] == [
        "cancellation_requested",
        "status_transition",
        "cancellation_completed",
    ]


def test_a_malformed_answer_fails_the_operation_naming_the_problem(pipeline: Pipeline) -> None:
    pipeline.fake.add_order(order("broken-json", ("SKU-A", 1)), malformed="json")
    pipeline.fake.add_order(order("broken-contract", ("SKU-A", 1)), malformed="contract")
    ids = [submit_operation("broken-json"), submit_operation("broken-contract")]
    rows = pipeline.wait_for(ids)
    assert [row.status for row in rows] == ["failed", "failed"]
    assert {row.last_error_type for row in rows} == {"ContractViolation"}
    assert all(row.retry_count == 0 for row in rows)  # permanent: not retried
    assert "breaks the contract" in (rows[1].last_error or "")


def test_fifty_orders_racing_for_ten_units_complete_exactly_ten(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"HOT": 10})
    for index in range(50):
        pipeline.fake.add_order(order(f"rush-{index}", ("HOT", 1)))
    ids = [submit_operation(f"rush-{index}") for index in range(50)]
    rows = pipeline.wait_for(ids, timeout_s=120)
    statuses = [row.status for row in rows]
    assert statuses.count("completed") == 10
    assert statuses.count("failed") == 40
    assert pipeline.stock("HOT") == 0
    assert pipeline.ledger_matches_stock("HOT")


def test_submitting_the_same_order_twice_returns_the_same_operation(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-A": 5})
    pipeline.fake.add_order(order("twice", ("SKU-A", 1)))
    first = submit_operation("twice", "shop-1")
    second = submit_operation("twice", "shop-1")
    third = submit_operation("twice")
    assert first == second == third
    pipeline.wait_for([first])
    assert pipeline.stock("SKU-A") == 4
    assert pipeline.actions(first).count("operation_created") == 1


def test_the_same_stage_delivered_twice_deducts_once_and_puts_once(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-D": 5})
    pipeline.fake.add_order(order("dup", ("SKU-D", 2)))
    operation_id = insert_operation(
        pipeline.database, order_id="dup", status=S.PROCESSING, lines=[("SKU-D", 2)]
    )
    sent = [deduct_stock.apply_async((str(operation_id),)) for _ in range(2)]
    pipeline.wait_for_status(operation_id, S.STOCK_DEDUCTED)
    sent += [sync_microservice.apply_async((str(operation_id),)) for _ in range(2)]
    pipeline.wait_for_status(operation_id, S.COMPLETED)
    pipeline.task_runs.wait_for_end([result.id for result in sent])  # the second copies too
    assert pipeline.stock("SKU-D") == 3
    assert pipeline.movements(operation_id) == [("SKU-D", -2, "deduction")]
    assert len(pipeline.applied_puts("dup")) == 1
    assert pipeline.actions(operation_id).count("stock_deduction_completed") == 1
    assert pipeline.actions(operation_id).count("microservice_sync_success") == 1


def test_a_re_enqueued_operation_gets_no_fresh_retry_budget(pipeline: Pipeline) -> None:
    pipeline.fake.add_order(order("spent", ("SKU-A", 1)), ready_after_reads=10_000)
    operation_id = insert_operation(
        pipeline.database, order_id="spent", status=S.PENDING, lines=[], retry_count=3
    )
    CeleryDispatcher().enqueue_pipeline(operation_id, S.PENDING, 1)
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "failed" and done.retry_count == 3
    assert pipeline.actions(operation_id).count("retry_scheduled") == 0  # failed at once

"""Cancellation at every stage through the real worker, the refusals, and the races."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import create_engine, select, text

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import PendingStockOperation
from stock_sync.composition import get_services
from stock_sync.domain.errors import CancellationRefused, OperationNotFound
from stock_sync.domain.statuses import OperationStatus
from stock_sync.producer import request_cancellation, submit_operation
from stock_sync.services.cancellation_results import CancellationResult
from tasks.stages import deduct_stock, load_line_items, sync_microservice
from tests.support import Pipeline, insert_operation, order

S = OperationStatus

# The last actions of a cancellation that gave the stock back and put the order back.
BOTH_SIDES_ROLLED_BACK = [
    "cancellation_requested",
    "stock_rollback_started",
    "stock_rollback_completed",
    "microservice_rollback_started",
    "status_transition",
    "microservice_rollback_completed",
    "cancellation_completed",
]


def cancel(operation_id: uuid.UUID, by: str = "tester", reason: str = "test") -> CancellationResult:
    return request_cancellation(operation_id, by, reason)


def adjustments_of(pipeline: Pipeline, operation_id: uuid.UUID) -> list[PendingStockOperation]:
    return pipeline.rows(
        select(PendingStockOperation)
        .where(PendingStockOperation.parent_operation_id == operation_id)
        .order_by(PendingStockOperation.created_at)
    )


def completed_order(pipeline: Pipeline, order_id: str, **stock: int) -> uuid.UUID:
    pipeline.set_stock(**stock)
    pipeline.fake.add_order(order(order_id, *((sku, 1) for sku in stock)))
    operation_id = submit_operation(order_id)
    assert pipeline.wait_for([operation_id])[0].status == "completed"
    return operation_id


def test_cancel_while_pending_stops_the_pipeline(
    pipeline: Pipeline, retry_limits: Callable[..., None]
) -> None:
    retry_limits(max_retries_pending=500, retry_backoff_max_s=0.05)
    pipeline.set_stock(**{"SKU-A": 5})
    operation_id = pipeline.submit(order("unpaid", ("SKU-A", 1)), ready_after_reads=100_000)
    pipeline.wait_for([operation_id], lambda op: op.retry_count >= 1)
    result = cancel(operation_id)
    assert (result.cancelled_from, result.final_status) == (S.PENDING, S.CANCELLED)
    assert not result.stock_restored and result.microservice_rollback == "not_needed"
    # The retry already scheduled came and found CANCELLED: it scheduled no other.
    pipeline.task_runs.wait_for_chain_end("stock_sync.load_line_items", operation_id)
    row = pipeline.operation(operation_id)
    assert (
        row.status == "cancelled"
        and row.cancelled_by == "tester"
        and row.cancellation_reason == "test"
    )
    assert pipeline.stock("SKU-A") == 5
    assert pipeline.actions(operation_id)[-3:] == [
        "cancellation_requested",
        "status_transition",
        "cancellation_completed",
    ]


def test_cancel_while_processing_leaves_stock_alone(
    pipeline: Pipeline, retry_limits: Callable[..., None]
) -> None:
    retry_limits(max_retries_processing=500, retry_backoff_max_s=0.05)
    pipeline.set_stock(**{"SKU-A": 0})
    operation_id = pipeline.submit(order("waiting", ("SKU-A", 1)))
    pipeline.wait_for([operation_id], lambda op: op.status == "processing" and op.retry_count >= 1)
    result = cancel(operation_id)
    assert result.cancelled_from is S.PROCESSING and not result.stock_restored
    pipeline.set_stock(**{"SKU-A": 3})  # stock arrives: the cancelled order must not take it
    pipeline.task_runs.wait_for_chain_end("stock_sync.validate_stock", operation_id)
    redelivered = deduct_stock.apply_async((str(operation_id),))  # and no late stage does
    (run,) = pipeline.task_runs.wait_for_end([redelivered.id])
    assert run.state == "SUCCESS"
    assert pipeline.stock("SKU-A") == 3
    assert pipeline.movements(operation_id) == []


def test_cancel_after_deduction_restores_stock_in_an_adjustment(
    pipeline: Pipeline, retry_limits: Callable[..., None]
) -> None:
    retry_limits(max_retries_stock_deducted=500, max_retries_rollback=500, retry_backoff_max_s=0.05)
    pipeline.set_stock(**{"SKU-A": 5, "SKU-B": 5})
    operation_id = pipeline.submit(order("deducted", ("SKU-A", 2), ("SKU-B", 1)), fail_puts=100_000)
    pipeline.wait_for(
        [operation_id], lambda op: op.status == "stock_deducted" and op.retry_count >= 1
    )
    assert (pipeline.stock("SKU-A"), pipeline.stock("SKU-B")) == (3, 4)
    result = cancel(operation_id, "support", "customer asked")
    pipeline.fake.add_order({**pipeline.fake.order("deducted"), "fail_puts": 0})
    assert result.cancelled_from is S.STOCK_DEDUCTED and result.stock_restored
    assert sorted((m.sku, m.delta) for m in result.restored_movements) == [
        ("SKU-A", 2),
        ("SKU-B", 1),
    ]
    # The sync PUTs were answered 503: any of them may have landed behind a gateway.
    assert result.microservice_rollback == "pending"
    assert (pipeline.stock("SKU-A"), pipeline.stock("SKU-B")) == (5, 5)
    restoration, rollback = adjustments_of(pipeline, operation_id)
    assert (restoration.operation_type, restoration.status) == ("stock_restoration", "completed")
    assert sorted(pipeline.movements(restoration.id)) == [
        ("SKU-A", 2, "restoration"),
        ("SKU-B", 1, "restoration"),
    ]
    assert pipeline.operation(operation_id).rollback_operations == [
        str(restoration.id),
        str(rollback.id),
    ]
    assert pipeline.ledger_matches_stock("SKU-A") and pipeline.ledger_matches_stock("SKU-B")
    pipeline.wait_for_status(rollback.id, S.COMPLETED)
    assert pipeline.fake.order("deducted")["fulfillment_status"] == "NEW"
    assert pipeline.actions(operation_id)[-7:] == BOTH_SIDES_ROLLED_BACK


def test_cancel_after_deduction_before_any_sync_put_needs_no_microservice_rollback(
    clean_database: Database,
) -> None:
    operation_id = insert_operation(clean_database, status=S.STOCK_DEDUCTED, lines=[("SKU-A", 1)])

    result = get_services().cancellation.cancel_operation(operation_id, "support", "changed mind")

    assert (result.cancelled_from, result.microservice_rollback) == (S.STOCK_DEDUCTED, "not_needed")
    assert (
        result.message
        == "cancelled from stock_deducted; no stock to restore; microservice untouched"
    )


def test_cancel_after_completion_restores_stock_and_the_microservice(pipeline: Pipeline) -> None:
    operation_id = completed_order(pipeline, "done-then-cancelled", **{"SKU-A": 4})
    assert pipeline.fake.order("done-then-cancelled")["fulfillment_status"] == "PROCESSING"
    result = cancel(operation_id)
    assert result.cancelled_from is S.COMPLETED and result.stock_restored
    assert pipeline.stock("SKU-A") == 4
    restoration, rollback = adjustments_of(pipeline, operation_id)
    assert restoration.operation_type == "stock_restoration"
    assert rollback.operation_type == "microservice_rollback"
    pipeline.wait_for([rollback.id], lambda op: op.status == "completed")
    assert pipeline.fake.order("done-then-cancelled")["fulfillment_status"] == "NEW"
    (put,) = [p for p in pipeline.applied_puts("done-then-cancelled") if p["status"] == "NEW"]
    assert put["idempotency_key"].startswith(f"stock-sync:{rollback.id}:rollback:")
    final = get_services().cancellation.result_of(operation_id)
    assert final.microservice_rollback == "completed"
    assert set(final.adjustment_operation_ids) == {restoration.id, rollback.id}
    assert pipeline.actions(operation_id)[-7:] == BOTH_SIDES_ROLLED_BACK


def cancelled_with_refused_puts(
    pipeline: Pipeline, order_id: str, refused_puts: int
) -> tuple[uuid.UUID, PendingStockOperation]:
    """A completed order (one SKU-A) cancelled while the fake refuses its next
    ``refused_puts`` PUTs: the operation's id and its microservice rollback, once settled."""
    operation_id = completed_order(pipeline, order_id, **{"SKU-A": 1})
    pipeline.fake.add_order({**pipeline.fake.order(order_id), "fail_puts": refused_puts})
    cancel(operation_id)
    (_, rollback) = adjustments_of(pipeline, operation_id)
    (settled,) = pipeline.wait_for([rollback.id])
    return operation_id, settled


def test_a_microservice_rollback_that_fails_twice_then_succeeds(pipeline: Pipeline) -> None:
    _, rollback = cancelled_with_refused_puts(pipeline, "flaky-rollback", 2)
    assert rollback.status == "completed"
    assert pipeline.actions(rollback.id).count("retry_scheduled") == 2
    assert pipeline.fake.order("flaky-rollback")["fulfillment_status"] == "NEW"


def test_a_microservice_rollback_that_never_succeeds_fails_alone(pipeline: Pipeline) -> None:
    operation_id, rollback = cancelled_with_refused_puts(pipeline, "dead-rollback", 100_000)
    assert rollback.status == "failed"
    assert "max_retries_reached" in pipeline.actions(rollback.id)
    parent = pipeline.operation(operation_id)
    assert parent.status == "cancelled" and pipeline.stock("SKU-A") == 1
    assert get_services().cancellation.result_of(operation_id).microservice_rollback == "failed"
    last = pipeline.events(operation_id)[-1]
    assert last.action == "cancellation_completed" and last.details["outcome"] == "error"


def test_failed_and_unknown_operations_are_refused(pipeline: Pipeline) -> None:
    operation_id = pipeline.submit(order("will-fail", ("NOWHERE", 1)), malformed="json")
    assert pipeline.wait_for([operation_id])[0].status == "failed"
    with pytest.raises(CancellationRefused, match="it is failed"):
        cancel(operation_id)
    with pytest.raises(OperationNotFound, match="operation not found"):
        cancel(uuid.uuid4())


def test_cancelling_twice_returns_the_first_result_and_changes_nothing(pipeline: Pipeline) -> None:
    operation_id = completed_order(pipeline, "cancel-twice", **{"SKU-A": 2})
    first = cancel(operation_id, "alice", "first")
    second = cancel(operation_id, "bob", "second")
    assert second.cancelled_from is S.COMPLETED and second.cancelled_by == "alice"
    assert second.adjustment_operation_ids == first.adjustment_operation_ids
    assert second.restored_movements == first.restored_movements
    assert pipeline.stock("SKU-A") == 2
    assert pipeline.actions(operation_id).count("cancellation_requested") == 1
    rollback = next(
        a
        for a in adjustments_of(pipeline, operation_id)
        if a.operation_type == "microservice_rollback"
    )
    pipeline.wait_for([rollback.id])  # leave nothing in flight for the next test


# --- races --------------------------------------------------------------------------------


def wait_until_blocked_on_a_lock(postgres_url: str, count: int = 1) -> None:
    engine = create_engine(postgres_url)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                waiting = connection.execute(
                    text(
                        "select count(*) from pg_stat_activity"
                        " where datname = current_database() and wait_event_type = 'Lock'"
                    )
                ).scalar()
            if waiting and waiting >= count:
                return
            time.sleep(0.02)
        raise AssertionError(f"expected {count} sessions waiting on a lock")
    finally:
        engine.dispose()


def test_cancel_arriving_while_deduct_stock_runs_restores_exactly_once(
    pipeline: Pipeline, postgres_url: str
) -> None:
    pipeline.set_stock(**{"SKU-R": 5})
    operation_id = insert_operation(
        pipeline.database, order_id="race-deduct", status=S.PROCESSING, lines=[("SKU-R", 2)]
    )
    # Hold the stock row: deduct_stock takes the operation lock, then waits here mid-transaction.
    blocker = create_engine(postgres_url).connect()
    blocker_tx = blocker.begin()
    blocker.execute(text("select quantity from stock_levels where sku = 'SKU-R' for update"))
    deduct_stock.apply_async((str(operation_id),))
    wait_until_blocked_on_a_lock(postgres_url, 1)
    with ThreadPoolExecutor(max_workers=1) as pool:
        cancelling = pool.submit(cancel, operation_id)
        wait_until_blocked_on_a_lock(postgres_url, 2)  # the cancel now queues on the row
        blocker_tx.rollback()
        blocker.close()
        result = cancelling.result(timeout=30)
    assert result.cancelled_from is S.STOCK_DEDUCTED and result.stock_restored
    assert pipeline.stock("SKU-R") == 5
    assert pipeline.movements(operation_id) == [("SKU-R", -2, "deduction")]
    assert pipeline.ledger_matches_stock("SKU-R")
    redelivered = deduct_stock.apply_async((str(operation_id),))  # afterwards: moves nothing
    (run,) = pipeline.task_runs.wait_for_end([redelivered.id])
    assert run.state == "SUCCESS"
    assert pipeline.stock("SKU-R") == 5 and pipeline.operation(operation_id).status == "cancelled"
    assert pipeline.movements(operation_id) == [("SKU-R", -2, "deduction")]


def test_cancel_arriving_before_deduct_stock_means_no_deduction(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-R": 5})
    operation_id = insert_operation(
        pipeline.database, order_id="race-deduct-2", status=S.PROCESSING, lines=[("SKU-R", 2)]
    )
    result = cancel(operation_id)
    assert result.cancelled_from is S.PROCESSING
    redelivered = deduct_stock.apply_async((str(operation_id),))
    (run,) = pipeline.task_runs.wait_for_end([redelivered.id])
    assert run.state == "SUCCESS"
    assert pipeline.stock("SKU-R") == 5 and pipeline.movements(operation_id) == []


def test_cancel_while_the_sync_put_is_in_flight_is_compensated(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-S": 3})
    operation_id = pipeline.submit(order("race-sync", ("SKU-S", 1)), put_latency_s=0.6)
    deadline = time.monotonic() + 30
    while not pipeline.applied_puts("race-sync"):  # the PUT has landed, its answer is still coming
        assert time.monotonic() < deadline, "the sync PUT never arrived"
        time.sleep(0.01)
    result = cancel(operation_id)
    assert result.cancelled_from is S.STOCK_DEDUCTED and pipeline.stock("SKU-S") == 3
    rollback = pipeline.wait_for(
        [operation_id],
        lambda op: any(
            a.operation_type == "microservice_rollback" for a in adjustments_of(pipeline, op.id)
        ),
    )
    assert rollback[0].status == "cancelled"
    microservice_rollback = next(
        a
        for a in adjustments_of(pipeline, operation_id)
        if a.operation_type == "microservice_rollback"
    )
    pipeline.wait_for([microservice_rollback.id], lambda op: op.status == "completed")
    assert pipeline.fake.order("race-sync")["fulfillment_status"] == "NEW"
    assert pipeline.operation(operation_id).status == "cancelled"
    assert [p["status"] for p in pipeline.applied_puts("race-sync")] == ["PROCESSING", "NEW"]


def test_two_cancels_at_once_have_one_effect(pipeline: Pipeline, postgres_url: str) -> None:
    pipeline.set_stock(**{"SKU-T": 1})
    operation_id = insert_operation(
        pipeline.database, order_id="race-cancel", status=S.PROCESSING, lines=[("SKU-T", 1)]
    )
    deduct_stock.apply_async((str(operation_id),))
    pipeline.wait_for_status(operation_id, S.STOCK_DEDUCTED)
    # Hold the operation row until both cancels queue on it: they really are at once.
    with ThreadPoolExecutor(max_workers=2) as pool:
        with pipeline.database.engine.connect() as blocker, blocker.begin():
            blocker.execute(
                text("select 1 from pending_stock_operations where id = :id for update"),
                {"id": operation_id},
            )
            cancels = [pool.submit(cancel, operation_id, who, "race") for who in ("a", "b")]
            wait_until_blocked_on_a_lock(postgres_url, 2)
        first, second = (future.result(timeout=30) for future in cancels)
    assert first.adjustment_operation_ids == second.adjustment_operation_ids
    assert first.cancelled_by == second.cancelled_by and first.stock_restored
    assert pipeline.stock("SKU-T") == 1
    assert len(adjustments_of(pipeline, operation_id)) == 1
    assert pipeline.ledger_matches_stock("SKU-T")


def test_a_stage_redelivered_after_a_cancel_moves_nothing(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-U": 4})
    pipeline.fake.add_order(order("redelivered", ("SKU-U", 1)))
    operation_id = insert_operation(
        pipeline.database, order_id="redelivered", status=S.PENDING, lines=[]
    )
    cancel(operation_id)
    sent = [
        task.apply_async((str(operation_id),))
        for task in (load_line_items, deduct_stock, sync_microservice)
    ]
    runs = pipeline.task_runs.wait_for_end([result.id for result in sent])
    assert [run.state for run in runs] == ["SUCCESS"] * 3
    row = pipeline.operation(operation_id)
    assert row.status == "cancelled" and row.line_items == []
    assert pipeline.stock("SKU-U") == 4 and pipeline.fake.fulfillment_requests() == []

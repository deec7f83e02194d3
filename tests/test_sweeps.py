"""The stuck-operation sweep on real PostgreSQL: re-drive, no fresh budget, one sweeper."""

from __future__ import annotations

import contextlib
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import PendingStockOperation, utcnow
from stock_sync.adapters.settings import load_settings
from stock_sync.composition import build_services, get_services, sweeper_for
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.services.sweeps import StuckOperationSweeper, SweepReport
from tests.support import Pipeline, order

S = OperationStatus


class RecordingDispatcher:
    """A fake dispatcher: remembers what it was asked to enqueue."""

    def __init__(self) -> None:
        self.pipelines: list[tuple[uuid.UUID, OperationStatus]] = []
        self.rollbacks: list[uuid.UUID] = []
        self._lock = threading.Lock()

    def enqueue_pipeline(self, operation_id: uuid.UUID, status: OperationStatus) -> None:
        with self._lock:
            self.pipelines.append((operation_id, status))

    def enqueue_rollback(self, adjustment_operation_id: uuid.UUID) -> None:
        with self._lock:
            self.rollbacks.append(adjustment_operation_id)


def stuck_operation(
    database: Database,
    order_id: str,
    status: S = S.PENDING,
    *,
    idle_s: float = 3600,
    retry_count: int = 0,
    operation_type: OperationType = OperationType.ORDER_DEDUCTION,
    **fields: Any,
) -> uuid.UUID:
    operation_id = uuid.uuid4()
    long_ago = utcnow() - timedelta(seconds=idle_s)
    with database.transaction() as session:
        session.add(
            PendingStockOperation(
                id=operation_id,
                order_id=order_id,
                status=status.value,
                operation_type=operation_type.value,
                retry_count=retry_count,
                created_at=long_ago,
                updated_at=long_ago,
                **fields,
            )
        )
    return operation_id


def recording_sweeper(
    database: Database, **settings: Any
) -> tuple[StuckOperationSweeper, RecordingDispatcher]:
    """A sweeper of ``database`` whose dispatcher records; ``settings`` override the loaded."""
    dispatcher = RecordingDispatcher()
    configured = load_settings().model_copy(update=settings)
    services = build_services(configured, dispatcher=dispatcher, database=database)
    return sweeper_for(services), dispatcher


def test_a_pending_row_with_no_message_is_completed_after_a_sweep(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-W": 2})
    pipeline.fake.add_order(order("lost-message", ("SKU-W", 1)))
    operation_id = stuck_operation(pipeline.database, "lost-message")
    report = sweeper_for(get_services()).sweep()
    assert report.redriven == [operation_id]
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "completed" and pipeline.stock("SKU-W") == 1
    assert pipeline.actions(operation_id)[0] == "retry_scheduled"  # the sweep's re-drive


def test_only_stuck_operations_are_redriven(clean_database: Database) -> None:
    stuck = stuck_operation(clean_database, "old")
    stuck_operation(clean_database, "fresh", idle_s=1)
    stuck_operation(clean_database, "finished", S.COMPLETED)
    stuck_operation(clean_database, "retry-planned", next_retry_at=utcnow() + timedelta(seconds=60))
    deducted = stuck_operation(clean_database, "mid-way", S.STOCK_DEDUCTED)
    sweeper, dispatcher = recording_sweeper(clean_database)
    sweeper.sweep()
    assert sorted(dispatcher.pipelines) == sorted(
        [(stuck, S.PENDING), (deducted, S.STOCK_DEDUCTED)]
    )


def test_a_redrive_counts_as_an_attempt_of_the_stage(clean_database: Database) -> None:
    operation_id = stuck_operation(clean_database, "half-used", retry_count=2)
    sweeper, dispatcher = recording_sweeper(clean_database)
    sweeper.sweep()
    assert dispatcher.pipelines == [(operation_id, S.PENDING)]
    with clean_database.transaction() as session:
        assert session.get(PendingStockOperation, operation_id).retry_count == 3  # type: ignore[union-attr]


def test_a_lost_last_retry_is_run_once_more_rather_than_failed(
    clean_database: Database,
) -> None:
    budget = load_settings().max_retries_processing
    operation_id = stuck_operation(
        clean_database, "last-retry-lost", S.PROCESSING, retry_count=budget
    )
    sweeper, dispatcher = recording_sweeper(clean_database)
    report = sweeper.sweep()
    assert report.redriven == [operation_id] and report.failed == []
    assert dispatcher.pipelines == [(operation_id, S.PROCESSING)]
    with clean_database.transaction() as session:
        row = session.get(PendingStockOperation, operation_id)
        assert row is not None and (row.status, row.retry_count) == ("processing", budget + 1)


def test_a_stage_that_dies_every_time_ends_failed_instead_of_being_redriven_forever(
    clean_database: Database,
) -> None:
    budget = load_settings().max_retries_processing
    operation_id = stuck_operation(clean_database, "dies-always", S.PROCESSING, retry_count=0)
    sweeper, dispatcher = recording_sweeper(clean_database)
    for _ in range(budget + 1):  # each re-driven run dies: the row is stuck again
        assert sweeper.sweep(now=utcnow() + timedelta(hours=1)).redriven == [operation_id]
    report = sweeper.sweep(now=utcnow() + timedelta(hours=1))
    assert report.failed == [operation_id]
    assert len(dispatcher.pipelines) == budget + 1
    with clean_database.transaction() as session:
        row = session.get(PendingStockOperation, operation_id)
        assert row is not None and row.status == "failed"


def test_deduct_stock_is_redriven_on_its_own_budget(clean_database: Database) -> None:
    validation_budget = load_settings().max_retries_processing
    operation_id = stuck_operation(
        clean_database,
        "deduct-waiting",
        S.PROCESSING,
        retry_count=validation_budget,  # validation used all of its own budget, then passed
        deduction_retry_count=1,
    )
    sweeper, _ = recording_sweeper(clean_database)
    assert sweeper.sweep().redriven == [operation_id]
    with clean_database.transaction() as session:
        row = session.get(PendingStockOperation, operation_id)
        assert row is not None
        assert (row.retry_count, row.deduction_retry_count) == (validation_budget, 2)


def test_a_stuck_microservice_rollback_is_enqueued_again(clean_database: Database) -> None:
    parent = stuck_operation(clean_database, "parent", S.CANCELLED)
    rollback = stuck_operation(
        clean_database,
        "parent",
        operation_type=OperationType.MICROSERVICE_ROLLBACK,
        parent_operation_id=parent,
        target_fulfillment_status="NEW",
    )
    sweeper, dispatcher = recording_sweeper(clean_database)
    sweeper.sweep()
    assert dispatcher.rollbacks == [rollback] and dispatcher.pipelines == []


def sweep_during_the_first_claim(
    monkeypatch: pytest.MonkeyPatch, first: StuckOperationSweeper, second: StuckOperationSweeper
) -> tuple[SweepReport, SweepReport]:
    """Run ``first.sweep()``; once its first batch is claimed (committed, not yet re-driven),
    run the whole of ``second.sweep()`` in another thread. Both reports; any error raised."""
    claim = first._claim_batch
    during: list[Future[SweepReport]] = []

    def claim_then_let_the_other_sweep(now: datetime) -> list[uuid.UUID]:
        claimed = claim(now)
        if not during:
            assert claimed, "the first sweep found nothing to claim"
            with ThreadPoolExecutor(max_workers=1) as pool:
                during.append(pool.submit(second.sweep))
                during[0].result(timeout=60)
        return claimed

    monkeypatch.setattr(first, "_claim_batch", claim_then_let_the_other_sweep)
    report = first.sweep()
    assert during, "the second sweep never ran inside the first"
    return report, during[0].result()


def test_a_sweep_started_while_another_holds_a_claimed_batch_skips(
    clean_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = {stuck_operation(clean_database, f"stuck-{i}") for i in range(30)}
    (first, first_sent), (second, second_sent) = [
        recording_sweeper(clean_database) for _ in range(2)
    ]

    first_report, second_report = sweep_during_the_first_claim(monkeypatch, first, second)

    assert second_report.ran is False and second_sent.pipelines == []
    assert first_report.ran is True and sorted(first_report.redriven) == sorted(ids)
    assert sorted(op for op, _ in first_sent.pipelines) == sorted(ids)  # each exactly once


def test_two_sweeps_past_the_lock_split_the_stuck_operations_between_them(
    clean_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim is the second guard: should two sweeps run at once (the advisory lock goes
    with its connection, and a dropped connection leaves the sweep running), they still
    never re-drive an operation twice."""
    ids = {stuck_operation(clean_database, f"stuck-{i}") for i in range(30)}
    (first, first_sent), (second, second_sent) = [
        recording_sweeper(clean_database, sweep_batch_size=10) for _ in range(2)
    ]
    for sweeper in (first, second):
        monkeypatch.setattr(sweeper, "_exclusive", lambda: contextlib.nullcontext(True))

    first_report, second_report = sweep_during_the_first_claim(monkeypatch, first, second)

    first_ids = [op for op, _ in first_sent.pipelines]
    second_ids = [op for op, _ in second_sent.pipelines]
    assert sorted(first_ids + second_ids) == sorted(ids)  # each exactly once
    # The first claimed one batch, the second swept the other two meanwhile.
    assert (len(first_ids), len(second_ids)) == (10, 20)
    assert (first_report.batches, second_report.batches) == (1, 2)


def test_a_sweep_holding_the_lock_makes_another_skip(
    clean_database: Database, postgres_url: str
) -> None:
    from sqlalchemy import create_engine

    from stock_sync.services.sweeps import SWEEP_ADVISORY_LOCK_KEY

    stuck_operation(clean_database, "waiting")
    holder = create_engine(postgres_url).connect()
    holder.execute(text("select pg_advisory_lock(:k)"), {"k": SWEEP_ADVISORY_LOCK_KEY})
    try:
        sweeper, dispatcher = recording_sweeper(clean_database)
        assert sweeper.sweep().ran is False and dispatcher.pipelines == []
    finally:
        holder.execute(text("select pg_advisory_unlock(:k)"), {"k": SWEEP_ADVISORY_LOCK_KEY})
        holder.close()
    assert sweeper.sweep().ran is True and len(dispatcher.pipelines) == 1


def test_the_sweep_query_uses_the_status_updated_at_index(clean_database: Database) -> None:
    from sqlalchemy import select

    from stock_sync.services.stuck import is_stuck

    with clean_database.transaction() as session:
        session.execute(text("set local enable_seqscan = off"))
        statement = select(PendingStockOperation.id).where(is_stuck(utcnow(), 900))
        compiled = statement.compile(session.get_bind(), compile_kwargs={"literal_binds": True})
        plan = "\n".join(row[0] for row in session.execute(text(f"explain {compiled}")))
    assert "ix_pending_stock_operations_status_updated_at" in plan

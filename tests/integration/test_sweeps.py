"""The stuck-operation sweep on real PostgreSQL: waiting is not stuck, a lost message is
re-driven without spending the budget, a dead attempt counts as one, parked retries come back
when due, one sweeper at a time."""

from __future__ import annotations

import contextlib
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text, update

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import (
    QUEUE_PROBES_TABLE,
    PendingStockOperation,
    read_database_now,
)
from stock_sync.adapters.settings import load_settings
from stock_sync.composition import build_services, get_services, sweeper_for
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.services.stuck import StuckWindow
from stock_sync.services.sweeps import StuckOperationSweeper, SweepReport
from tasks.dispatch import CeleryDispatcher
from tests.support import (
    Pipeline,
    RecordingDispatcher,
    capture_operation_logs,
    order,
    wait_for_record,
)

S = OperationStatus
HOUR = 3600.0


def database_now(database: Database) -> datetime:
    with database.engine.connect() as connection:
        return read_database_now(connection)


def stuck_operation(
    database: Database,
    order_id: str,
    status: S = S.PENDING,
    *,
    dispatched_ago_s: float | None = HOUR,
    started_ago_s: float | None = None,
    retry_count: int = 0,
    operation_type: OperationType = OperationType.ORDER_DEDUCTION,
    **fields: Any,
) -> uuid.UUID:
    """A live row whose message was published ``dispatched_ago_s`` ago (None: no message, a
    parked retry) and, with ``started_ago_s``, whose attempt began then and never ended."""
    operation_id = uuid.uuid4()
    now = database_now(database)

    def ago(seconds: float | None) -> datetime | None:
        return None if seconds is None else now - timedelta(seconds=seconds)

    with database.transaction() as session:
        session.add(
            PendingStockOperation(
                id=operation_id,
                order_id=order_id,
                status=status.value,
                operation_type=operation_type.value,
                retry_count=retry_count,
                created_at=ago(2 * HOUR),
                updated_at=ago(dispatched_ago_s or HOUR),
                dispatched_at=ago(dispatched_ago_s),
                attempt_started_at=ago(started_ago_s),
                **fields,
            )
        )
    return operation_id


def probe(database: Database, *, dispatched_ago_s: float, consumed_ago_s: float | None) -> None:
    """A probe of the configured pipeline queue, as the sweep sends and a worker records it."""
    now = database_now(database)
    with database.transaction() as session:
        session.execute(
            insert(QUEUE_PROBES_TABLE).values(
                queue=load_settings().queue_name,
                dispatched_at=now - timedelta(seconds=dispatched_ago_s),
                consumed_at=(
                    None if consumed_ago_s is None else now - timedelta(seconds=consumed_ago_s)
                ),
            )
        )


def row(database: Database, operation_id: uuid.UUID) -> PendingStockOperation:
    with database.transaction() as session:
        found = session.get(PendingStockOperation, operation_id)
        assert found is not None
        return found


def recording_sweeper(
    database: Database, **settings: Any
) -> tuple[StuckOperationSweeper, RecordingDispatcher]:
    """A sweeper of ``database`` whose dispatcher records; ``settings`` override the loaded."""
    dispatcher = RecordingDispatcher()
    configured = load_settings().model_copy(update=settings)
    services = build_services(configured, dispatcher=dispatcher, database=database)
    return sweeper_for(services), dispatcher


# --- end to end ---------------------------------------------------------------------------


def test_an_operation_whose_message_was_lost_completes_once_a_probe_has_come_through(
    pipeline: Pipeline,
) -> None:
    pipeline.set_stock(**{"SKU-W": 2})
    pipeline.fake.add_order(order("lost-message", ("SKU-W", 1)))
    operation_id = stuck_operation(pipeline.database, "lost-message", retry_count=1)
    sweeper = sweeper_for(get_services())

    first = sweeper.sweep()
    assert first.redriven == [] and first.probe_sent  # nothing proves the message lost yet
    deadline = time.monotonic() + 30
    while not probes_consumed(pipeline.database):
        assert time.monotonic() < deadline, "the worker never took the probe"
        time.sleep(0.05)
    grace = timedelta(seconds=get_services().settings.task_time_limit_s + 1)
    second = sweeper.sweep(now=database_now(pipeline.database) + grace)

    assert second.redriven == [operation_id] and second.lost == [operation_id]
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "completed" and pipeline.stock("SKU-W") == 1
    assert pipeline.actions(operation_id)[0] == "retry_scheduled"  # the sweep's re-drive
    assert "was lost" in str(pipeline.events(operation_id)[0].details)


def probes_consumed(database: Database) -> int:
    with database.transaction() as session:
        query = select(func.count()).where(QUEUE_PROBES_TABLE.c.consumed_at.is_not(None))
        return int(session.scalar(query) or 0)


def test_a_copy_of_an_older_dispatch_is_dropped_at_once(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-W": 2})
    pipeline.fake.add_order(order("stale-copy", ("SKU-W", 1)))
    operation_id = stuck_operation(
        pipeline.database, "stale-copy", dispatched_ago_s=0, dispatch_generation=2
    )
    with capture_operation_logs("stock_sync.stages") as records:
        CeleryDispatcher().enqueue_pipeline(operation_id, S.PENDING, 1)
        skipped = wait_for_record(records, lambda r: "a copy of dispatch 1" in r.getMessage())
    assert skipped.operation_id == str(operation_id)  # type: ignore[attr-defined]
    assert pipeline.actions(operation_id) == []  # it did not even start loading the order
    assert row(pipeline.database, operation_id).status == "pending"

    CeleryDispatcher().enqueue_pipeline(operation_id, S.PENDING, 2)
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "completed" and pipeline.stock("SKU-W") == 1


# --- waiting is not stuck -----------------------------------------------------------------


def test_a_backlog_of_any_age_is_waiting_not_stuck(clean_database: Database) -> None:
    """Messages three hours old that never started: the queue has not reached them (the
    newest probe that came through was sent before them), so nothing is re-driven, no
    budget is spent, nothing fails."""
    waiting = [
        stuck_operation(clean_database, f"backlog-{i}", dispatched_ago_s=3 * HOUR, retry_count=2)
        for i in range(20)
    ]
    sweeper, dispatcher = recording_sweeper(clean_database)
    assert sweeper.sweep().redriven == []  # no probe has come through at all

    probe(clean_database, dispatched_ago_s=4 * HOUR, consumed_ago_s=3.5 * HOUR)
    probe(clean_database, dispatched_ago_s=2 * HOUR, consumed_ago_s=None)  # still queued
    report = sweeper.sweep(now=database_now(clean_database) + timedelta(hours=24))

    assert (report.redriven, report.failed, dispatcher.pipelines) == ([], [], [])
    assert {row(clean_database, i).retry_count for i in waiting} == {2}
    assert {row(clean_database, i).dispatch_generation for i in waiting} == {1}


def test_a_probe_that_came_through_within_the_grace_proves_nothing_yet(
    clean_database: Database,
) -> None:
    """A worker may hold a message it took from the queue until its pool frees a slot (at most
    the hard time limit): a probe run more recently than that proves nothing yet."""
    operation_id = stuck_operation(clean_database, "held-by-a-busy-worker")
    probe(clean_database, dispatched_ago_s=60, consumed_ago_s=10)
    sweeper, _ = recording_sweeper(clean_database)
    assert sweeper.sweep().redriven == []
    later = database_now(clean_database) + timedelta(seconds=load_settings().task_time_limit_s)
    assert sweeper.sweep(now=later).redriven == [operation_id]


def test_a_lost_message_is_redriven_as_a_new_dispatch_without_spending_the_budget(
    clean_database: Database,
) -> None:
    lost = stuck_operation(clean_database, "lost", S.PROCESSING, retry_count=2)
    deducted = stuck_operation(clean_database, "lost-mid-way", S.STOCK_DEDUCTED)
    fresh = stuck_operation(clean_database, "fresh", dispatched_ago_s=1)
    stuck_operation(clean_database, "finished", S.COMPLETED)
    probe(clean_database, dispatched_ago_s=0.5 * HOUR, consumed_ago_s=0.5 * HOUR)
    sweeper, dispatcher = recording_sweeper(clean_database)

    report = sweeper.sweep()

    assert sorted(report.lost) == sorted([lost, deducted]) and report.dead == []
    assert sorted(dispatcher.pipelines) == sorted(
        [(lost, S.PROCESSING), (deducted, S.STOCK_DEDUCTED)]
    )
    assert dispatcher.generations == {lost: 2, deducted: 2}
    redriven = row(clean_database, lost)
    assert (redriven.retry_count, redriven.dispatch_generation) == (2, 2)
    assert redriven.dispatched_at is not None
    assert redriven.dispatched_at > database_now(clean_database) - timedelta(minutes=1)
    assert row(clean_database, fresh).dispatch_generation == 1


def test_an_operation_is_redriven_at_most_once_per_stuck_window(clean_database: Database) -> None:
    operation_id = stuck_operation(clean_database, "lost-twice")
    probe(clean_database, dispatched_ago_s=0.5 * HOUR, consumed_ago_s=0.5 * HOUR)
    sweeper, dispatcher = recording_sweeper(clean_database)
    assert sweeper.sweep().redriven == [operation_id]
    probe(clean_database, dispatched_ago_s=0, consumed_ago_s=0)  # the queue moves on at once
    assert sweeper.sweep().redriven == []  # its new dispatch is not stuck-window old
    assert len(dispatcher.pipelines) == 1


def test_a_planned_retry_is_lost_only_once_it_is_overdue(clean_database: Database) -> None:
    now = database_now(clean_database)
    planned = stuck_operation(clean_database, "planned", next_retry_at=now + timedelta(seconds=60))
    overdue = stuck_operation(clean_database, "overdue", next_retry_at=now - timedelta(hours=1))
    probe(clean_database, dispatched_ago_s=0.5 * HOUR, consumed_ago_s=0.5 * HOUR)
    sweeper, _ = recording_sweeper(clean_database)
    report = sweeper.sweep()
    assert report.redriven == [overdue] and planned not in report.redriven


# --- dead attempts ------------------------------------------------------------------------


def test_a_dead_attempt_counts_as_an_attempt_of_the_stage(clean_database: Database) -> None:
    operation_id = stuck_operation(
        clean_database, "half-used", dispatched_ago_s=HOUR, started_ago_s=HOUR, retry_count=2
    )
    sweeper, dispatcher = recording_sweeper(clean_database)  # no probe needed: it started
    report = sweeper.sweep()
    assert report.dead == [operation_id] and report.lost == []
    assert dispatcher.pipelines == [(operation_id, S.PENDING)]
    redriven = row(clean_database, operation_id)
    assert (redriven.retry_count, redriven.attempt_started_at) == (3, None)


def test_an_attempt_still_running_is_not_dead(clean_database: Database) -> None:
    stuck_operation(clean_database, "running", dispatched_ago_s=HOUR, started_ago_s=5)
    sweeper, dispatcher = recording_sweeper(clean_database)
    assert sweeper.sweep().redriven == [] and dispatcher.pipelines == []


def test_a_dead_last_retry_is_run_once_more_rather_than_failed(clean_database: Database) -> None:
    budget = load_settings().max_retries_processing
    operation_id = stuck_operation(
        clean_database, "last-retry-died", S.PROCESSING, started_ago_s=HOUR, retry_count=budget
    )
    sweeper, dispatcher = recording_sweeper(clean_database)
    report = sweeper.sweep()
    assert report.redriven == [operation_id] and report.failed == []
    assert dispatcher.pipelines == [(operation_id, S.PROCESSING)]
    redriven = row(clean_database, operation_id)
    assert (redriven.status, redriven.retry_count) == ("processing", budget + 1)


def test_a_stage_that_dies_every_time_ends_failed_instead_of_being_redriven_forever(
    clean_database: Database,
) -> None:
    budget = load_settings().max_retries_pending
    operation_id = stuck_operation(clean_database, "dies-always", started_ago_s=HOUR)
    sweeper, dispatcher = recording_sweeper(clean_database)
    later = database_now(clean_database) + timedelta(hours=2)
    for _ in range(budget + 1):  # each re-driven attempt starts, then its worker dies
        assert sweeper.sweep(now=later).redriven == [operation_id]
        start_attempt_of(clean_database, operation_id)
    report = sweeper.sweep(now=later)
    assert report.failed == [operation_id]
    assert len(dispatcher.pipelines) == budget + 1
    failed = row(clean_database, operation_id)
    assert (failed.status, failed.failed_stage) == ("failed", "load_line_items")


def start_attempt_of(database: Database, operation_id: uuid.UUID) -> None:
    """What a network stage does when its attempt begins (services.stuck)."""
    op = PendingStockOperation
    with database.transaction() as session:
        session.execute(
            update(op).where(op.id == operation_id).values(attempt_started_at=op.dispatched_at)
        )


def test_deduct_stock_is_redriven_on_its_own_budget(clean_database: Database) -> None:
    validation_budget = load_settings().max_retries_processing
    operation_id = stuck_operation(
        clean_database,
        "deduct-waiting",
        S.PROCESSING,
        started_ago_s=HOUR,
        retry_count=validation_budget,  # validation used all of its own budget, then passed
        deduction_retry_count=1,
    )
    sweeper, _ = recording_sweeper(clean_database)
    assert sweeper.sweep().redriven == [operation_id]
    redriven = row(clean_database, operation_id)
    assert (redriven.retry_count, redriven.deduction_retry_count) == (validation_budget, 2)


def test_a_stuck_microservice_rollback_is_enqueued_again(clean_database: Database) -> None:
    parent = stuck_operation(clean_database, "parent", S.CANCELLED)
    rollback = stuck_operation(
        clean_database,
        "parent",
        started_ago_s=HOUR,
        operation_type=OperationType.MICROSERVICE_ROLLBACK,
        parent_operation_id=parent,
        target_fulfillment_status="NEW",
    )
    sweeper, dispatcher = recording_sweeper(clean_database)
    sweeper.sweep()
    assert dispatcher.rollbacks == [rollback] and dispatcher.pipelines == []
    assert dispatcher.generations == {rollback: 2}


# --- parked retries -----------------------------------------------------------------------


def test_parked_retries_are_released_when_due_and_never_swept(clean_database: Database) -> None:
    now = database_now(clean_database)
    due = stuck_operation(
        clean_database, "due", dispatched_ago_s=None, next_retry_at=now - timedelta(seconds=1)
    )
    later = stuck_operation(
        clean_database, "later", dispatched_ago_s=None, next_retry_at=now + timedelta(hours=1)
    )
    probe(clean_database, dispatched_ago_s=0, consumed_ago_s=HOUR)
    sweeper, dispatcher = recording_sweeper(clean_database)
    assert sweeper.sweep(now=now + timedelta(days=1)).redriven == []  # waiting in the row

    report = sweeper.release_due_retries()

    assert report.released == [due] and dispatcher.pipelines == [(due, S.PENDING)]
    assert dispatcher.generations == {due: 2}
    released = row(clean_database, due)
    assert released.dispatched_at is not None and released.dispatch_generation == 2
    assert row(clean_database, later).dispatched_at is None
    assert sweeper.release_due_retries().released == []  # released once


# --- probes -------------------------------------------------------------------------------


def test_one_probe_waits_in_the_queue_at_a_time(clean_database: Database) -> None:
    sweeper, dispatcher = recording_sweeper(clean_database)
    assert sweeper.sweep().probe_sent and sweeper.sweep().probe_sent is False
    assert len(dispatcher.probes) == 1
    with clean_database.transaction() as session:
        session.execute(update(QUEUE_PROBES_TABLE).values(consumed_at=func.now()))
    assert sweeper.sweep().probe_sent  # that one came through: the next may go
    assert len(dispatcher.probes) == 2


def test_old_probes_are_deleted_but_the_newest_that_came_through(clean_database: Database) -> None:
    probe(clean_database, dispatched_ago_s=3 * 24 * HOUR, consumed_ago_s=3 * 24 * HOUR)
    probe(clean_database, dispatched_ago_s=2 * 24 * HOUR, consumed_ago_s=2 * 24 * HOUR)
    probe(clean_database, dispatched_ago_s=2 * 24 * HOUR, consumed_ago_s=None)
    sweeper, _ = recording_sweeper(clean_database)
    sweeper.sweep()
    with clean_database.transaction() as session:
        kept = session.execute(
            select(QUEUE_PROBES_TABLE.c.dispatched_at, QUEUE_PROBES_TABLE.c.consumed_at).order_by(
                QUEUE_PROBES_TABLE.c.id
            )
        ).all()
    assert len(kept) == 2  # the newest that came through, and the one just sent
    assert kept[0].consumed_at is not None and kept[1].consumed_at is None


# --- one sweeper at a time ----------------------------------------------------------------


def sweep_during_the_first_batch(
    monkeypatch: pytest.MonkeyPatch, first: StuckOperationSweeper, second: StuckOperationSweeper
) -> tuple[SweepReport, SweepReport]:
    """Run ``first.sweep()``; once it has read its first batch of stuck operations (not yet
    re-driven), run the whole of ``second.sweep()`` in another thread. Both reports; any
    error raised."""
    candidates = first._candidates
    during: list[Future[SweepReport]] = []

    def read_then_let_the_other_sweep(window: StuckWindow) -> list[uuid.UUID]:
        found = candidates(window)
        if not during:
            assert found, "the first sweep found nothing stuck"
            with ThreadPoolExecutor(max_workers=1) as pool:
                during.append(pool.submit(second.sweep))
                during[0].result(timeout=60)
        return found

    monkeypatch.setattr(first, "_candidates", read_then_let_the_other_sweep)
    report = first.sweep()
    assert during, "the second sweep never ran inside the first"
    return report, during[0].result()


def test_a_sweep_started_while_another_runs_skips(
    clean_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = {stuck_operation(clean_database, f"stuck-{i}", started_ago_s=HOUR) for i in range(30)}
    (first, first_sent), (second, second_sent) = [
        recording_sweeper(clean_database) for _ in range(2)
    ]

    first_report, second_report = sweep_during_the_first_batch(monkeypatch, first, second)

    assert second_report.ran is False and second_sent.pipelines == []
    assert first_report.ran is True and sorted(first_report.redriven) == sorted(ids)
    assert sorted(op for op, _ in first_sent.pipelines) == sorted(ids)  # each exactly once


def test_two_sweeps_past_the_lock_still_redrive_each_operation_once(
    clean_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second guard: should two sweeps run at once (a lock lost with its connection), each
    re-checks an operation under its row lock before re-driving it, and a re-driven one is a
    new dispatch, no longer stuck. The second sweep, run inside the first's first batch,
    re-drives them all; the first finds its batch re-driven meanwhile and leaves it."""
    ids = {stuck_operation(clean_database, f"stuck-{i}", started_ago_s=HOUR) for i in range(30)}
    (first, first_sent), (second, second_sent) = [
        recording_sweeper(clean_database, sweep_batch_size=10) for _ in range(2)
    ]
    for sweeper in (first, second):
        monkeypatch.setattr(sweeper, "_exclusive", lambda: contextlib.nullcontext(True))

    first_report, second_report = sweep_during_the_first_batch(monkeypatch, first, second)

    first_ids = [op for op, _ in first_sent.pipelines]
    second_ids = [op for op, _ in second_sent.pipelines]
    assert sorted(first_ids + second_ids) == sorted(ids)  # each exactly once
    assert (len(first_ids), len(second_ids)) == (0, 30)
    assert (first_report.batches, second_report.batches) == (1, 3)


def test_a_sweep_holding_the_lock_makes_another_skip(
    clean_database: Database, postgres_url: str
) -> None:
    from sqlalchemy import create_engine

    from stock_sync.services.sweeps import SWEEP_ADVISORY_LOCK_KEY

    stuck_operation(clean_database, "waiting", started_ago_s=HOUR)
    holder = create_engine(postgres_url).connect()
    holder.execute(text("select pg_advisory_lock(:k)"), {"k": SWEEP_ADVISORY_LOCK_KEY})
    try:
        sweeper, dispatcher = recording_sweeper(clean_database)
        assert sweeper.sweep().ran is False and dispatcher.pipelines == []
    finally:
        holder.execute(text("select pg_advisory_unlock(:k)"), {"k": SWEEP_ADVISORY_LOCK_KEY})
        holder.close()
    assert sweeper.sweep().ran is True and len(dispatcher.pipelines) == 1


def test_the_sweep_query_reads_the_live_rows_only_by_index(
    clean_database: Database,
) -> None:
    from stock_sync.services.stuck import StuckWindow, is_stuck

    now = database_now(clean_database)
    window = StuckWindow(now, 900, 90, frontier=now - timedelta(minutes=5))
    with clean_database.transaction() as session:
        session.execute(text("set local enable_seqscan = off"))
        statement = select(PendingStockOperation.id).where(is_stuck(window))
        compiled = statement.compile(session.get_bind(), compile_kwargs={"literal_binds": True})
        plan = "\n".join(r[0] for r in session.execute(text(f"explain {compiled}")))
    # the live statuses are an index condition: the finished rows are never read
    assert "Index Cond: ((status)::text = ANY ('{pending,processing,stock_deducted}'" in plan
    assert "ix_pending_stock_operations_status_" in plan


def test_a_long_retry_waits_in_the_row_with_no_message_until_released(
    pipeline: Pipeline, retry_limits: Any
) -> None:
    """Every wait of this test is longer than the park threshold: the load that finds the order
    unpaid ends its chain without a countdown message (no message waits in a worker), the row
    records the retry, and only the release brings it back."""
    retry_limits(retry_backoff_base_s=0.4, retry_backoff_max_s=0.4, retry_park_after_s=0.1)
    pipeline.set_stock(**{"SKU-P": 1})
    operation_id = pipeline.submit(order("parked", ("SKU-P", 1)), ready_after_reads=1)

    ended = pipeline.task_runs.wait_for_chain_end("stock_sync.load_line_items", operation_id)
    assert ended.state == "SUCCESS"  # it did not retry itself: no countdown message exists
    parked = row(pipeline.database, operation_id)
    assert (parked.status, parked.dispatched_at, parked.retry_count) == ("pending", None, 1)
    assert parked.next_retry_at is not None
    assert "waits in the database" in str(pipeline.events(operation_id)[-1].details)

    sweeper = sweeper_for(get_services())
    deadline = time.monotonic() + 30
    while not sweeper.release_due_retries().released:  # due within 0.2-0.4 s
        assert time.monotonic() < deadline, "the parked retry was never released"
        time.sleep(0.05)
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "completed" and done.dispatch_generation == 2

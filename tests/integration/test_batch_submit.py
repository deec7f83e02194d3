"""submit_operations: many orders in one transaction and one broker connection, each getting
what submit_operation would give it; on real PostgreSQL and Redis with the in-process worker."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from kombu.exceptions import OperationalError
from sqlalchemy import func, select

from stock_sync import producer
from stock_sync.adapters.db import Database
from stock_sync.adapters.models import MetricCounter, OperationEvent, PendingStockOperation
from stock_sync.composition import Services, build_services
from stock_sync.domain.errors import BatchEnqueueFailed, InvalidInput
from stock_sync.domain.statuses import OperationStatus
from stock_sync.producer import default_services, submit_operation, submit_operations
from tasks.dispatch import CeleryDispatcher
from tests.support import (
    Pipeline,
    RecordingDispatcher,
    insert_operation,
    order,
    wait_for_lock_waiters,
)

S = OperationStatus


def count_rows(database: Database) -> tuple[int, int, int]:
    """Operations, events, and the operations_created counter."""
    with database.transaction() as session:
        operations = session.scalar(select(func.count()).select_from(PendingStockOperation))
        events = session.scalar(select(func.count()).select_from(OperationEvent))
        created = session.scalar(
            select(func.coalesce(func.sum(MetricCounter.value), 0)).where(
                MetricCounter.name == "operations_created"
            )
        )
    return int(operations or 0), int(events or 0), int(created or 0)


@pytest.fixture
def recorded(pipeline_environment: str, clean_database: Database) -> Services:
    """Services whose dispatcher only records: what the batch writes, with no worker."""
    return build_services(database=clean_database, dispatcher=RecordingDispatcher())


# --- end to end -------------------------------------------------------------------------------


def test_a_batch_returns_ids_in_input_order_and_every_new_operation_completes(
    pipeline: Pipeline,
) -> None:
    pipeline.set_stock(**{"SKU-B": 10})
    for name in ("b-1", "b-2", "b-3"):
        pipeline.fake.add_order(order(name, ("SKU-B", 2)))

    submission = submit_operations([("b-2", "shop-1"), ("b-1", None), ("b-3", "shop-1")])

    ids = submission.operation_ids
    assert len(set(ids)) == 3 and submission.created == ids
    rows = pipeline.wait_for(ids)
    assert [(row.order_id, row.status) for row in rows] == [
        ("b-2", "completed"),
        ("b-1", "completed"),
        ("b-3", "completed"),
    ]
    assert pipeline.stock("SKU-B") == 4 and pipeline.ledger_matches_stock("SKU-B")


def test_duplicates_and_already_submitted_orders_map_to_one_operation_each(
    pipeline: Pipeline,
) -> None:
    pipeline.set_stock(**{"SKU-B": 10})
    for name in ("d-old", "d-new"):
        pipeline.fake.add_order(order(name, ("SKU-B", 1)))
    old = submit_operation("d-old", "shop-1")

    submission = submit_operations(
        [("d-new", None), ("d-old", None), ("d-new", "shop-1"), ("d-old", "shop-1")]
    )

    new = submission.operation_ids[0]
    assert submission.operation_ids == [new, old, new, old]
    assert submission.created == [new]
    pipeline.wait_for([old, new])
    assert count_rows(pipeline.database)[0] == 2
    assert len(pipeline.applied_puts("d-new")) == 1  # enqueued once, synced once
    # one batch later, nothing new
    again = submit_operations([("d-old", None), ("d-new", None)])
    assert again.operation_ids == [old, new] and again.created == []


# --- what a batch writes, without a worker ----------------------------------------------------


def test_each_new_row_is_written_as_submit_operation_writes_it(
    recorded: Services, clean_database: Database
) -> None:
    single = submit_operation("w-single", "shop-1", services=recorded)
    submission = submit_operations([("w-1", "shop-1"), ("w-2", None)], services=recorded)

    columns = [
        c.key for c in PendingStockOperation.__table__.columns if c.key not in ("id", "order_id")
    ]
    with clean_database.transaction() as session:
        rows = {row.order_id: row for row in session.scalars(select(PendingStockOperation))}
        events = session.execute(
            select(OperationEvent.operation_id, OperationEvent.action, OperationEvent.to_status)
        ).all()
    stamped = ("created_at", "updated_at", "dispatched_at")
    reference = {c: getattr(rows["w-single"], c) for c in columns if c not in stamped}
    for name in ("w-1", "w-2"):
        row = rows[name]
        expected = {**reference, "account_name": "shop-1" if name == "w-1" else None}
        assert {c: getattr(row, c) for c in columns if c not in stamped} == expected
        assert row.dispatch_generation == 1 and row.status == "pending"
        assert row.dispatched_at is not None and row.created_at == row.updated_at
    # the database's clock of the batch's one transaction stamped both
    assert rows["w-1"].dispatched_at == rows["w-2"].dispatched_at
    assert sorted(events) == sorted(
        (operation_id, "operation_created", None)
        for operation_id in (single, *submission.operation_ids)
    )
    assert count_rows(clean_database) == (3, 3, 3)
    assert recorded.dispatcher.pipelines == [  # type: ignore[attr-defined]
        (single, S.PENDING),
        *((operation_id, S.PENDING) for operation_id in submission.operation_ids),
    ]
    assert set(recorded.dispatcher.generations.values()) == {1}  # type: ignore[attr-defined]


def test_an_order_given_twice_records_the_account_of_its_first_entry(
    recorded: Services, clean_database: Database
) -> None:
    submission = submit_operations(
        [("a-1", None), ("a-2", "shop-2"), ("a-1", "shop-1"), ("a-2", None)], services=recorded
    )

    first, second = submission.operation_ids[:2]
    assert submission.operation_ids == [first, second, first, second]
    with clean_database.transaction() as session:
        rows = session.execute(
            select(PendingStockOperation.order_id, PendingStockOperation.account_name)
        )
        accounts = {order_id: account for order_id, account in rows}
    assert accounts == {"a-1": None, "a-2": "shop-2"}  # as submit_operation one by one records


def test_an_order_retried_already_returns_its_successor(
    recorded: Services, clean_database: Database
) -> None:
    failed = insert_operation(clean_database, order_id="r-1", status=S.FAILED)
    successor = recorded.recovery.retry_operation(failed).successor_operation_id
    before = count_rows(clean_database)

    submission = submit_operations([("r-1", None), ("r-1", "shop-1")], services=recorded)

    assert submission.operation_ids == [successor, successor] and submission.created == []
    assert count_rows(clean_database) == before


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([("ok-1", None), ("", None)], "orders[1]: order_id must not be empty"),
        ([("ok-1", None), ("has space", None)], "orders[1]: order_id must not contain whitespace"),
        ([("ok-1", None), ("ok-2", "x" * 129)], "orders[1]: account_name is longer than 128"),
        ([("ok-1", None), "ok-2"], "orders[1]: expected (order_id, account_name), got str"),
        ([("ok-1", None), ("ok-2",)], "orders[1]: expected (order_id, account_name), got tuple"),
        ("ok-1", "orders must be (order_id, account_name) pairs"),
        (
            [("ok-1", "shop-1"), ("ok-2", None), ("ok-1", "shop-2")],
            "orders[2]: account_name: order ok-1 is given for account 'shop-1' earlier",
        ),
        (
            [("ok-1", None), ("taken", "shop-2")],
            "orders[1]: account_name: order taken already has operation",
        ),
    ],
)
def test_a_bad_entry_refuses_the_whole_batch_and_writes_nothing(
    recorded: Services, clean_database: Database, entries: Any, message: str
) -> None:
    insert_operation(clean_database, order_id="taken", account_name="shop-1")
    before = count_rows(clean_database)

    with pytest.raises(InvalidInput) as refused:
        submit_operations(entries, services=recorded)

    assert str(refused.value).startswith(message)
    assert count_rows(clean_database) == before
    assert recorded.dispatcher.pipelines == []  # type: ignore[attr-defined]


def test_a_batch_that_races_a_single_submit_of_one_of_its_orders_returns_the_winner(
    recorded: Services, clean_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The single submit is held after its insert, uncommitted; the batch's insert waits on the
    unique index, fails once the single commits, and the batch runs again."""
    inserted, release = threading.Event(), threading.Event()
    real_record = producer._record_created

    def record_then_hold(connection: Any, created: Any, services: Any) -> None:
        real_record(connection, created, services)
        if threading.current_thread().name == "single":
            inserted.set()
            assert release.wait(30)

    monkeypatch.setattr(producer, "_record_created", record_then_hold)
    outcome: dict[str, Any] = {}
    single = threading.Thread(
        name="single",
        target=lambda: outcome.update(single=submit_operation("race-1", services=recorded)),
    )
    single.start()
    assert inserted.wait(30)
    batch = threading.Thread(
        target=lambda: outcome.update(
            batch=submit_operations([("race-0", None), ("race-1", None)], services=recorded)
        )
    )
    batch.start()
    wait_for_lock_waiters(clean_database, 1)  # the batch's insert waits for the single's row
    release.set()
    single.join(30)
    batch.join(30)

    submission = outcome["batch"]
    assert submission.operation_ids[1] == outcome["single"]
    assert submission.created == [submission.operation_ids[0]]
    assert count_rows(clean_database) == (2, 2, 2)


# --- a broker failure after the commit --------------------------------------------------------


class BrokerDiesAfter:
    """The real Celery dispatcher, whose broker connection is lost after ``published``
    messages of a batch (a kombu error, as a dead Redis raises)."""

    def __init__(self, published: int) -> None:
        self._published = published
        self._real = CeleryDispatcher()

    def enqueue_pipelines(
        self,
        dispatches: Sequence[tuple[uuid.UUID, OperationStatus, int]],
        on_published: Callable[[int], None] | None = None,
    ) -> None:
        self._real.enqueue_pipelines(dispatches[: self._published], on_published)
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_a_broker_failure_leaves_the_rest_pending_and_names_them(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-B": 10})
    for index in range(4):
        pipeline.fake.add_order(order(f"f-{index}", ("SKU-B", 1)))
    earlier = submit_operation("f-0")
    pipeline.wait_for([earlier])
    services = build_services(
        default_services().settings, database=pipeline.database, dispatcher=BrokerDiesAfter(2)
    )

    with pytest.raises(BatchEnqueueFailed) as failed:
        submit_operations([(f"f-{index}", None) for index in range(4)], services=services)

    error = failed.value
    assert error.operation_ids[0] == earlier and error.created == error.operation_ids[1:]
    assert error.not_enqueued == error.created[2:]
    assert "1 of 3 new operations saved as pending but not enqueued (OperationalError" in str(error)
    enqueued = pipeline.wait_for(error.created[:2])
    assert [row.status for row in enqueued] == ["completed", "completed"]
    (left,) = [pipeline.operation(operation_id) for operation_id in error.not_enqueued]
    assert (left.status, left.dispatch_generation) == ("pending", 1)
    assert left.dispatched_at is not None  # the sweep finds it once the threshold passes

"""Stock primitives on real PostgreSQL: all-or-nothing, exactly once, never below zero."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import IntegrityError

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import PendingStockOperation, StockLevel, StockMovement
from stock_sync.adapters.stock_ledger import (
    deduct_for_operation,
    get_stock,
    ledger_sum,
    restore_for_operation,
    set_stock,
)
from stock_sync.domain.errors import InsufficientStock, InvalidInput, UnknownSku
from stock_sync.domain.statuses import OperationType
from stock_sync.domain.stock import LineItem
from tests.support import wait_for_lock_waiters

T = TypeVar("T")


def new_operation(
    database: Database, *, operation_type: OperationType = OperationType.ORDER_DEDUCTION
) -> uuid.UUID:
    operation_id = uuid.uuid4()
    with database.transaction() as session:
        session.add(
            PendingStockOperation(
                id=operation_id,
                order_id=f"order-{operation_id.hex[:8]}",
                operation_type=operation_type.value,
            )
        )
    return operation_id


def line(line_id: str, sku: str, quantity: int) -> LineItem:
    return LineItem(id=line_id, offer_id="offer", sku=sku, quantity=quantity)


def stock_of(database: Database, sku: str) -> int | None:
    with database.transaction() as session:
        return get_stock(session, sku)


@contextmanager
def rows_held(database: Database, skus: Sequence[str]) -> Iterator[None]:
    """Hold the stock rows of ``skus`` (FOR UPDATE) for the block."""
    with database.engine.connect() as connection, connection.begin():
        for sku in skus:
            connection.execute(
                text("select 1 from stock_levels where sku = :sku for update"), {"sku": sku}
            )
        yield


def run_concurrently(
    database: Database, count: int, work: Callable[[int], T], *, queued_behind: Sequence[str]
) -> list[T]:
    """``work(0..count-1)`` in ``count`` threads; their results in index order. An exception
    of any thread (a deadlock included) is raised here, not lost with its thread.

    The stock rows of ``queued_behind`` are held until all ``count`` threads wait for a lock,
    then released: every thread is inside its transaction, queued, when the race starts.
    """
    with ThreadPoolExecutor(max_workers=count) as pool:
        with rows_held(database, queued_behind):
            futures = [pool.submit(work, index) for index in range(count)]
            try:
                wait_for_lock_waiters(database, count)
            except AssertionError:
                for future in futures:  # a thread that failed before queueing says why
                    if future.done():
                        future.result()
                raise
        return [future.result(timeout=60) for future in futures]


def test_set_stock_records_the_difference_as_a_correction(clean_database: Database) -> None:
    with clean_database.transaction() as session:
        set_stock(session, "SKU-1", 5)
        change = set_stock(session, "SKU-1", 3)
    assert (change.previous, change.quantity) == (5, 3)
    with clean_database.transaction() as session:
        deltas = session.scalars(select(StockMovement.delta).order_by(StockMovement.id)).all()
        assert deltas == [5, -2]
        assert ledger_sum(session, "SKU-1") == 3


@pytest.mark.parametrize(
    ("sku", "quantity", "message"),
    [("", 1, "SKU must not be empty"), ("A", -1, "quantity must be >= 0")],
)
def test_set_stock_refuses_bad_input(
    clean_database: Database, sku: str, quantity: int, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message), clean_database.transaction() as session:
        set_stock(session, sku, quantity)
    assert stock_of(clean_database, "A") is None


def test_the_check_constraint_refuses_negative_stock_even_past_the_code(
    clean_database: Database,
) -> None:
    with clean_database.transaction() as session:
        set_stock(session, "SKU-1", 1)
    with pytest.raises(IntegrityError), clean_database.transaction() as session:
        session.query(StockLevel).filter_by(sku="SKU-1").update({"quantity": -1})


def test_deduct_takes_every_line_and_records_one_row_per_line(clean_database: Database) -> None:
    operation_id = new_operation(clean_database)
    with clean_database.transaction() as session:
        set_stock(session, "A", 5)
        set_stock(session, "B", 5)
    with clean_database.transaction() as session:
        outcome = deduct_for_operation(
            session, operation_id, [line("2", "B", 2), line("1", "A", 1)]
        )
    assert not outcome.already_done
    assert [(m.sku, m.delta) for m in outcome.movements] == [("A", -1), ("B", -2)]
    assert (stock_of(clean_database, "A"), stock_of(clean_database, "B")) == (4, 3)


def test_deducting_twice_changes_nothing_the_second_time(clean_database: Database) -> None:
    operation_id = new_operation(clean_database)
    with clean_database.transaction() as session:
        set_stock(session, "A", 5)
    for _ in range(2):
        with clean_database.transaction() as session:
            deduct_for_operation(session, operation_id, [line("1", "A", 2)])
    assert stock_of(clean_database, "A") == 3


def test_one_short_line_changes_nothing(clean_database: Database) -> None:
    operation_id = new_operation(clean_database)
    with clean_database.transaction() as session:
        set_stock(session, "A", 5)
        set_stock(session, "B", 1)
    with pytest.raises(InsufficientStock) as raised, clean_database.transaction() as session:
        deduct_for_operation(session, operation_id, [line("1", "A", 2), line("2", "B", 3)])
    assert [(s.sku, s.requested, s.available) for s in raised.value.shortages] == [("B", 3, 1)]
    assert (stock_of(clean_database, "A"), stock_of(clean_database, "B")) == (5, 1)
    with clean_database.transaction() as session:
        assert (
            session.scalar(
                select(func.count())
                .select_from(StockMovement)
                .where(StockMovement.operation_id == operation_id)
            )
            == 0
        )


def test_an_unknown_sku_changes_nothing(clean_database: Database) -> None:
    operation_id = new_operation(clean_database)
    with clean_database.transaction() as session:
        set_stock(session, "A", 5)
    with pytest.raises(UnknownSku, match="NOPE"), clean_database.transaction() as session:
        deduct_for_operation(session, operation_id, [line("1", "A", 2), line("2", "NOPE", 1)])
    assert stock_of(clean_database, "A") == 5


def test_restore_negates_exactly_the_recorded_deduction_once(clean_database: Database) -> None:
    operation_id = new_operation(clean_database)
    adjustment_id = new_operation(clean_database, operation_type=OperationType.STOCK_RESTORATION)
    with clean_database.transaction() as session:
        set_stock(session, "A", 5)
        deduct_for_operation(session, operation_id, [line("1", "A", 2)])
        set_stock(session, "A", 10)  # a correction in between is not undone
    with clean_database.transaction() as session:
        first = restore_for_operation(session, operation_id, adjustment_id)
    with clean_database.transaction() as session:
        second = restore_for_operation(session, operation_id, adjustment_id)
    assert [(m.sku, m.delta) for m in first.movements] == [("A", 2)]
    assert second.already_done and not second.movements
    assert stock_of(clean_database, "A") == 12
    with clean_database.transaction() as session:
        assert ledger_sum(session, "A") == 12


def test_two_threads_racing_for_the_last_unit_exactly_one_wins(clean_database: Database) -> None:
    operations = [new_operation(clean_database) for _ in range(2)]
    with clean_database.transaction() as session:
        set_stock(session, "LAST", 1)

    def race(index: int) -> bool:
        """True when this thread took the unit, False when it was refused."""
        try:
            with clean_database.transaction() as session:
                deduct_for_operation(session, operations[index], [line("1", "LAST", 1)])
        except InsufficientStock:
            return False
        return True

    assert sorted(run_concurrently(clean_database, 2, race, queued_behind=["LAST"])) == [
        False,
        True,
    ]
    assert stock_of(clean_database, "LAST") == 0


RACERS = 24


@pytest.fixture
def racers(postgres_url: str) -> Iterator[Engine]:
    """Connections for RACERS transactions at once (a Database's pool holds 15)."""
    engine = create_engine(postgres_url, pool_size=RACERS, max_overflow=0)
    yield engine
    engine.dispose()


def test_many_threads_on_one_sku_never_go_below_zero_and_the_ledger_adds_up(
    clean_database: Database, racers: Engine
) -> None:
    stock = 10
    operations = [new_operation(clean_database) for _ in range(RACERS)]
    with clean_database.transaction() as session:
        set_stock(session, "HOT", stock)
        set_stock(session, "COLD", 100)

    def race(index: int) -> tuple[int, bool]:
        """(quantity asked for, served); anything but a refusal (a deadlock) is raised."""
        quantity = 1 + index % 3
        # Two SKUs per order, listed in opposite orders: half the threads queue on each row
        # unless the deduction locks them in its one order.
        lines = [line("1", "HOT", quantity), line("2", "COLD", 1)][:: 1 if index % 2 else -1]
        try:
            with racers.begin() as connection:
                deduct_for_operation(connection, operations[index], lines)
        except InsufficientStock:
            return quantity, False
        return quantity, True

    outcomes = run_concurrently(clean_database, RACERS, race, queued_behind=["HOT", "COLD"])
    served = [quantity for quantity, ok in outcomes if ok]
    remaining = stock_of(clean_database, "HOT")
    # 48 units asked for 10 by eight orders each of 1, 2 and 3 units: in whatever order they
    # are served the SKU sells out (no refusal leaves stock behind), in at least 4 deductions.
    assert remaining == 0 and sum(served) == stock and len(served) >= 4
    assert stock_of(clean_database, "COLD") == 100 - len(served)
    with clean_database.transaction() as session:
        assert ledger_sum(session, "HOT") == remaining
        assert ledger_sum(session, "COLD") == 100 - len(served)

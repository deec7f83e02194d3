"""set_stock keeps quantities within the 4-byte INTEGER columns, on SQLite and PostgreSQL alike:
a refused quantity raises InvalidInput naming it and writes nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from stock_sync.adapters import schema
from stock_sync.adapters.db import Database
from stock_sync.adapters.models import StockMovement
from stock_sync.adapters.stock_ledger import MAX_STOCK_QUANTITY, get_stock, ledger_sum, set_stock
from stock_sync.domain.errors import InvalidInput


@pytest.fixture(scope="module")
def sqlite_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path_factory.mktemp('bounds') / 'stock.sqlite3'}"
    schema.upgrade(url)
    database = Database(url)
    yield database
    database.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request: pytest.FixtureRequest) -> Database:
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_database")  # type: ignore[no-any-return]
    return request.getfixturevalue("clean_database")  # type: ignore[no-any-return]


def movements(database: Database) -> int:
    with database.transaction() as session:
        return session.scalar(select(func.count()).select_from(StockMovement)) or 0


@pytest.mark.parametrize(
    ("quantity", "message"),
    [
        (2**31, "quantity must be >= 0 and <= 2147483647, got 2147483648"),
        (2**63, "quantity must be >= 0 and <= 2147483647, got 9223372036854775808"),
        (10**20, "quantity must be >= 0 and <= 2147483647, got 100000000000000000000"),
        (-1, "quantity must be >= 0 and <= 2147483647, got -1"),
        (3.0, "quantity must be a whole number, got 3.0"),
        (True, "quantity must be a whole number, got True"),
    ],
)
def test_a_quantity_out_of_bounds_is_refused_and_writes_nothing(
    any_database: Database, quantity: int, message: str
) -> None:
    with any_database.transaction() as session:
        set_stock(session, "BOUNDS-1", 5)
    before = movements(any_database)

    with pytest.raises(InvalidInput) as raised, any_database.transaction() as session:
        set_stock(session, "BOUNDS-1", quantity)

    assert str(raised.value) == message
    assert movements(any_database) == before
    with any_database.transaction() as session:
        assert get_stock(session, "BOUNDS-1") == 5


def test_the_largest_quantity_is_stored_exactly_and_can_go_back_to_zero(
    any_database: Database,
) -> None:
    for quantity in (MAX_STOCK_QUANTITY, 0, MAX_STOCK_QUANTITY):
        with any_database.transaction() as session:
            set_stock(session, "BOUNDS-MAX", quantity)
    with any_database.transaction() as session:
        level = get_stock(session, "BOUNDS-MAX")
        assert level == MAX_STOCK_QUANTITY and isinstance(level, int)
        assert ledger_sum(session, "BOUNDS-MAX") == MAX_STOCK_QUANTITY

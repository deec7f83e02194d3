"""One lock order for stock rows on every path, whatever the database collation.

On an ICU (en-US) database SQL sorts "apple-1" before "Zebra-1" and Python the other way
round; a deduction and a restoration that disagreed about the order deadlocked. Here both are
made to queue on the same first row, so a wrong order on either side is a deadlock, every time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from stock_sync.adapters import schema
from stock_sync.adapters.db import Database
from stock_sync.adapters.microservice_client import MicroserviceClient
from stock_sync.adapters.settings import load_settings
from stock_sync.adapters.stock_ledger import deduct_for_operation, get_stock, set_stock
from stock_sync.composition import Services, build_services
from stock_sync.devtools.fake_microservice import FakeMicroservice
from stock_sync.domain import stages
from stock_sync.domain.stages import StageOutcome
from stock_sync.domain.statuses import OperationStatus
from stock_sync.domain.stock import LineItem, in_lock_order
from tests.support import RecordingDispatcher, insert_operation, wait_for_lock_waiters

S = OperationStatus
SKUS = ("apple-1", "Zebra-1")


@pytest.fixture(scope="module")
def icu_database(make_throwaway_database: Any) -> Iterator[Database]:
    url = make_throwaway_database(
        "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
    )
    schema.upgrade(url)
    database = Database(url)
    yield database
    database.dispose()


@pytest.fixture
def services(icu_database: Database, fake_microservice: FakeMicroservice) -> Iterator[Services]:
    with icu_database.transaction() as session:
        session.execute(
            text(
                "TRUNCATE operation_events, stock_movements, stock_levels,"
                " pending_stock_operations RESTART IDENTITY CASCADE"
            )
        )
        for sku in SKUS:
            set_stock(session, sku, 10)
    built = build_services(
        load_settings(),
        database=icu_database,
        dispatcher=RecordingDispatcher(),
        client=MicroserviceClient(fake_microservice.url),
    )
    yield built
    built.client.close()


def test_the_collation_and_the_lock_order_disagree_here(icu_database: Database) -> None:
    with icu_database.engine.connect() as connection:
        assert connection.execute(text("select 'apple-1' < 'Zebra-1'")).scalar() is True
    lines = [LineItem(f"l-{sku}", "o", sku, 1) for sku in SKUS]
    assert [line.sku for line in in_lock_order(lines)] == ["Zebra-1", "apple-1"]


def test_a_deduction_and_a_restoration_sharing_skus_do_not_deadlock(
    services: Services, icu_database: Database
) -> None:
    lines = [(sku, 1) for sku in SKUS]
    to_cancel = insert_operation(icu_database, status=S.STOCK_DEDUCTED, lines=lines)
    with icu_database.transaction() as session:
        deduct_for_operation(
            session, to_cancel, [LineItem(f"c-{sku}", "o", sku, 1) for sku in SKUS]
        )
    to_deduct = insert_operation(icu_database, status=S.PROCESSING, lines=lines)
    first_in_lock_order = in_lock_order([LineItem("x", "o", sku, 1) for sku in SKUS])[0].sku

    blocker = icu_database.engine.connect()
    blocker_transaction = blocker.begin()
    blocker.execute(
        text("select 1 from stock_levels where sku = :sku for update"), {"sku": first_in_lock_order}
    )
    outcomes: dict[str, Any] = {}

    def deduct() -> None:
        outcomes["deduct"] = services.synchronization.execute(stages.DEDUCT_STOCK, to_deduct)

    def cancel() -> None:
        try:
            outcomes["cancel"] = services.cancellation.cancel_operation(to_cancel, "ops", "lock")
        except Exception as error:  # a deadlock surfaces here as an OperationalError
            outcomes["cancel"] = error

    deducting = threading.Thread(target=deduct)
    deducting.start()
    wait_for_lock_waiters(icu_database, 1)  # the deduction queues first on the first row
    cancelling = threading.Thread(target=cancel)
    cancelling.start()
    wait_for_lock_waiters(icu_database, 2)  # the restoration queues behind it, holding nothing
    blocker_transaction.rollback()
    blocker.close()
    deducting.join(30)
    cancelling.join(30)

    assert outcomes["deduct"].retry_in_s is None, "the deduction lost a deadlock"
    assert outcomes["deduct"].outcome is StageOutcome.DONE
    assert not isinstance(outcomes["cancel"], Exception), outcomes["cancel"]
    assert outcomes["cancel"].final_status is S.CANCELLED
    with icu_database.transaction() as session:
        assert [get_stock(session, sku) for sku in SKUS] == [9, 9]

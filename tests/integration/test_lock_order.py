"""One lock order for stock rows on every path, whatever the database collation.

On an ICU (en-US) database SQL sorts "apple-1" before "Zebra-1" and Python the other way
round; a deduction and a restoration that disagreed about the order deadlocked. Here both are
made to queue on one held row, each row in turn: a side that locks in the wrong order takes
the other row first, so the release is a deadlock, every time. Held "Zebra-1" (first in the
lock order) catches a restoration in SQL order, held "apple-1" a deduction in SQL order.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import text

from stock_sync.adapters import schema
from stock_sync.adapters.db import Database
from stock_sync.adapters.microservice_client import MicroserviceClient
from stock_sync.adapters.settings import load_settings
from stock_sync.adapters.stock_ledger import deduct_for_operation, get_stock, set_stock
from stock_sync.composition import Services, build_services
from stock_sync.domain import stages
from stock_sync.domain.stages import StageOutcome
from stock_sync.domain.statuses import OperationStatus
from stock_sync.domain.stock import LineItem, in_lock_order
from stock_sync.services.cancellation_results import CancellationResult
from stock_sync.services.stage_runner import StageResult
from stock_sync_fake import FakeMicroservice
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


@pytest.mark.parametrize("held", SKUS)
def test_a_deduction_and_a_restoration_sharing_skus_do_not_deadlock(
    services: Services, icu_database: Database, held: str
) -> None:
    lines = [(sku, 1) for sku in SKUS]
    to_cancel = insert_operation(icu_database, status=S.STOCK_DEDUCTED, lines=lines)
    with icu_database.transaction() as session:
        deduct_for_operation(
            session, to_cancel, [LineItem(f"c-{sku}", "o", sku, 1) for sku in SKUS]
        )
    to_deduct = insert_operation(icu_database, status=S.PROCESSING, lines=lines)

    def deduct() -> StageResult:
        return services.synchronization.execute(stages.DEDUCT_STOCK, to_deduct)

    def cancel() -> CancellationResult:
        return services.cancellation.cancel_operation(to_cancel, "ops", "lock")

    with ThreadPoolExecutor(max_workers=2) as pool:
        with icu_database.engine.connect() as blocker, blocker.begin():
            blocker.execute(
                text("select 1 from stock_levels where sku = :sku for update"), {"sku": held}
            )
            deducting = pool.submit(deduct)
            wait_for_lock_waiters(icu_database, 1)  # the deduction waits first, at the held row
            cancelling = pool.submit(cancel)
            wait_for_lock_waiters(icu_database, 2)  # the restoration waits behind it
        # Released: a deadlock now aborts one side (raised here, or a retry of the deduction).
        deducted = deducting.result(timeout=60)
        cancelled = cancelling.result(timeout=60)

    assert deducted.retry_in_s is None, "the deduction lost a deadlock"
    assert deducted.outcome is StageOutcome.DONE
    assert cancelled.final_status is S.CANCELLED and cancelled.stock_restored
    with icu_database.transaction() as session:
        assert [get_stock(session, sku) for sku in SKUS] == [9, 9]

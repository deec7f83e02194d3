"""Invariant 3: no HTTP call and no enqueue while a database connection (and so a
transaction or a lock) is held. Every stage runs here in the test thread against a database
used by nothing else, with a client and a dispatcher that check the pool at each call."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from stock_sync.adapters.db import Database
from stock_sync.adapters.marketplace_contract import MicroserviceOrder
from stock_sync.adapters.microservice_client import MicroserviceClient
from stock_sync.adapters.models import PendingStockOperation
from stock_sync.adapters.notifications import Notification
from stock_sync.adapters.settings import load_settings
from stock_sync.composition import Services, build_services
from stock_sync.domain import stages
from stock_sync.domain.errors import InvalidInput
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.stages import StageOutcome
from stock_sync.domain.statuses import OperationStatus
from stock_sync.producer import submit_operation
from stock_sync.services.standardized_logger import StandardizedLogger
from stock_sync_fake import FakeMicroservice
from tests.support import order

S = OperationStatus


class HeldConnection(AssertionError):
    pass


def assert_no_connection_held(database: Database, what: str) -> None:
    held = database.engine.pool.checkedout()  # type: ignore[attr-defined]
    if held:
        raise HeldConnection(f"{what} while {held} database connection(s) were checked out")


class CheckingClient(MicroserviceClient):
    def __init__(self, database: Database, base_url: str) -> None:
        super().__init__(base_url, timeout_s=2.0)
        self.database = database
        self.calls: list[str] = []

    def get_order(self, order_id: str) -> MicroserviceOrder:
        assert_no_connection_held(self.database, f"GET {order_id}")
        self.calls.append("GET")
        return super().get_order(order_id)

    def set_fulfillment_status(self, order_id: str, **kwargs: Any) -> None:
        assert_no_connection_held(self.database, f"PUT {order_id}")
        self.calls.append(f"PUT {kwargs['status']}")
        super().set_fulfillment_status(order_id, **kwargs)


class CheckingDispatcher:
    def __init__(self, database: Database) -> None:
        self.database = database
        self.enqueued: list[str] = []

    def enqueue_pipeline(
        self, operation_id: uuid.UUID, status: OperationStatus, generation: int
    ) -> None:
        assert_no_connection_held(self.database, "enqueue_pipeline")
        self.enqueued.append(f"pipeline {status.value}")

    def enqueue_rollback(self, adjustment_operation_id: uuid.UUID, generation: int) -> None:
        assert_no_connection_held(self.database, "enqueue_rollback")
        self.enqueued.append(f"rollback {adjustment_operation_id}")

    def enqueue_probe(self, probe_id: int) -> None:
        assert_no_connection_held(self.database, "enqueue_probe")
        self.enqueued.append("probe")


class CheckingNotifier:
    """A notification sender stands for e-mail or chat: a network call."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.sent: list[Notification] = []

    def notify(self, notification: Notification) -> None:
        assert_no_connection_held(self.database, f"notify {notification.kind}")
        self.sent.append(notification)


@pytest.fixture
def services(
    clean_database: Database, postgres_url: str, fake_microservice: FakeMicroservice
) -> Iterator[Services]:
    fake_microservice.reset()
    database = Database(postgres_url)  # its own pool: only what this test does counts
    settings = load_settings()
    built = build_services(
        settings,
        database=database,
        dispatcher=CheckingDispatcher(database),
        notifier=CheckingNotifier(database),
        client=CheckingClient(database, fake_microservice.url),
    )
    yield built
    database.dispose()


def run(services: Services, stage: stages.Stage, operation_id: uuid.UUID) -> StageOutcome:
    result = services.synchronization.execute(stage, operation_id)
    if result.retry_in_s is not None:  # the stage failed and scheduled a retry: say why
        with services.database.transaction() as session:
            row = session.get(PendingStockOperation, operation_id)
            assert row is not None
            pytest.fail(f"stage {stage.name} failed: {row.last_error_type}: {row.last_error}")
    return result.outcome


def test_no_stage_calls_out_while_holding_a_connection(
    services: Services, fake_microservice: FakeMicroservice
) -> None:
    from stock_sync.adapters.stock_ledger import set_stock

    with services.database.transaction() as session:
        set_stock(session, "SKU-N", 3)
    fake_microservice.add_order(order("no-net", ("SKU-N", 1)))
    operation_id = submit_operation("no-net", services=services)
    for stage in stages.PIPELINE:
        assert run(services, stage, operation_id) is StageOutcome.DONE
    result = services.cancellation.cancel_operation(operation_id, "tester", "invariant 3")
    (rollback_id,) = [
        i
        for i in result.adjustment_operation_ids
        if f"rollback {i}" in services.dispatcher.enqueued
    ]  # type: ignore[attr-defined]
    assert run(services, stages.ROLLBACK, rollback_id) is StageOutcome.DONE
    client: CheckingClient = services.client  # type: ignore[assignment]
    # the sync PUT; then the rollback claims it (the same PUT again), reads, puts back
    assert client.calls == ["GET", "PUT PROCESSING", "PUT PROCESSING", "GET", "PUT NEW"]
    assert services.dispatcher.enqueued[0] == "pipeline pending"  # type: ignore[attr-defined]
    assert fake_microservice.order("no-net")["fulfillment_status"] == "NEW"


def test_the_check_itself_catches_a_call_made_inside_a_transaction(services: Services) -> None:
    with pytest.raises(HeldConnection), services.database.transaction() as session:
        session.execute(text("select 1"))  # the session now holds a connection
        services.client.get_order("anything")


def test_notifications_leave_after_the_commit(
    services: Services, fake_microservice: FakeMicroservice
) -> None:
    fake_microservice.add_order(order("short", ("SKU-NONE", 1)))
    operation_id = submit_operation("short", services=services)
    assert run(services, stages.LOAD_LINE_ITEMS, operation_id) is StageOutcome.DONE

    validation = services.synchronization.execute(stages.VALIDATE_STOCK, operation_id)
    services.synchronization.fail_operation(
        operation_id, stages.VALIDATE_STOCK, InvalidInput("given up by hand")
    )

    assert validation.retry_in_s is not None
    notifier: CheckingNotifier = services.synchronization._notifier  # type: ignore[attr-defined,assignment]
    assert [n.kind for n in notifier.sent] == ["stock_validation_failed", "operation_failed"]


def test_no_notification_for_a_retry_that_rolled_back(
    services: Services, fake_microservice: FakeMicroservice, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_microservice.add_order(order("rolled-back", ("SKU-NONE", 1)))
    operation_id = submit_operation("rolled-back", services=services)
    assert run(services, stages.LOAD_LINE_ITEMS, operation_id) is StageOutcome.DONE
    original = StandardizedLogger.log_action_with_timing

    def fail_on_retry_scheduled(self: StandardizedLogger, *args: Any, **kwargs: Any) -> None:
        if args[1] == LogAction.RETRY_SCHEDULED:
            raise RuntimeError("the database went away before the commit")
        original(self, *args, **kwargs)

    monkeypatch.setattr(StandardizedLogger, "log_action_with_timing", fail_on_retry_scheduled)
    with pytest.raises(RuntimeError):
        services.synchronization.execute(stages.VALIDATE_STOCK, operation_id)

    notifier: CheckingNotifier = services.synchronization._notifier  # type: ignore[attr-defined,assignment]
    assert notifier.sent == []
    with services.database.transaction() as session:
        row = session.get(PendingStockOperation, operation_id)
        assert row is not None and row.retry_count == 0

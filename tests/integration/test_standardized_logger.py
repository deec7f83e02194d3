"""The JSON vocabulary: parse what StandardizedLogger emits and check every field."""

from __future__ import annotations

import io
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select

from stock_sync.adapters.db import Database
from stock_sync.adapters.logging_setup import json_handler
from stock_sync.adapters.models import OperationEvent, PendingStockOperation
from stock_sync.adapters.operation_events import SqlEventStore
from stock_sync.domain.errors import InsufficientStock, MicroserviceTimeout, StockShortage
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.statuses import OperationStatus
from stock_sync.domain.stock import LineItem, validate_stock_levels
from stock_sync.services.standardized_logger import StandardizedLogger, measure_execution_time


class RecordingEventStore:
    """A fake event store that keeps what it was given."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def record(self, **event: Any) -> None:
        self.events.append(event)


@pytest.fixture
def captured() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    logger = logging.getLogger(f"test.{uuid.uuid4().hex}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(json_handler(stream))
    return logger, stream


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def bound_logger(
    logger: logging.Logger, events: Any = None
) -> tuple[StandardizedLogger, uuid.UUID]:
    operation_id = uuid.uuid4()
    log = StandardizedLogger(logger, events)
    log.bind(operation_id, order_id="order-1", status=OperationStatus.PENDING, attempt=2)
    return log, operation_id


@dataclass
class BoundLogger:
    """A StandardizedLogger bound to an operation (see :func:`bound_logger`), writing JSON
    records to :attr:`stream`."""

    log: StandardizedLogger
    operation_id: uuid.UUID
    stream: io.StringIO

    def records(self) -> list[dict[str, Any]]:
        return records(self.stream)


@pytest.fixture
def bound(captured: tuple[logging.Logger, io.StringIO]) -> BoundLogger:
    logger, stream = captured
    log, operation_id = bound_logger(logger)
    return BoundLogger(log, operation_id, stream)


def test_every_record_carries_the_operation_context(bound: BoundLogger) -> None:
    log, operation_id = bound.log, bound.operation_id
    log.log_action_with_timing(operation_id, LogAction.LINE_ITEMS_LOADING, "loading", 12)
    (record,) = bound.records()
    assert record["operation_id"] == str(operation_id)
    assert record["order_id"] == "order-1"
    assert record["action"] == "line_items_loading"
    assert record["status"] == "pending"
    assert record["attempt"] == 2
    assert record["execution_time_ms"] == 12
    assert record["level"] == "INFO" and record["message"] == "loading"
    assert "timestamp" in record


def test_a_transition_carries_from_to_and_reason_and_moves_the_bound_status(
    bound: BoundLogger,
) -> None:
    log, operation_id = bound.log, bound.operation_id
    log.log_status_transition(
        operation_id,
        OperationStatus.PENDING,
        OperationStatus.PROCESSING,
        "line items loaded",
        {"lines": 2},
    )
    log.log_action_with_timing(operation_id, LogAction.STOCK_VALIDATION_STARTED, "validating")
    transition, after = bound.records()
    assert transition["action"] == "status_transition"
    assert (transition["from_status"], transition["to_status"]) == ("pending", "processing")
    assert transition["status"] == "processing"
    assert after["status"] == "processing"


def test_a_validation_failure_lists_each_failing_line(bound: BoundLogger) -> None:
    log, operation_id = bound.log, bound.operation_id
    lines = [LineItem("1", "o", "A", 3), LineItem("2", "o", "B", 1), LineItem("3", "o", "Q", 1)]
    log.log_validation_failure(operation_id, validate_stock_levels(lines, {"A": 1, "B": 5}))
    (record,) = bound.records()
    assert record["action"] == "stock_validation_failed"
    assert record["level"] == "WARNING"
    assert {"sku": "A", "requested": 3, "available": 1} in record["validation_failures"]
    assert record["unknown_skus"] == ["Q"]


def test_an_error_carries_type_message_context_and_next_retry(bound: BoundLogger) -> None:
    log, operation_id = bound.log, bound.operation_id
    log.log_error_with_context(
        operation_id,
        MicroserviceTimeout("read timed out"),
        {"next_retry_at": "2026-11-26T10:00:00+00:00", "stage": "load_line_items"},
    )
    (record,) = bound.records()
    assert record["action"] == "line_items_load_failed"  # the PENDING stage's failure action
    assert record["error_type"] == "MicroserviceTimeout"
    assert record["error_message"] == "read timed out"
    assert record["retryable"] is True
    assert record["next_retry_at"] == "2026-11-26T10:00:00+00:00"
    assert record["context"] == {"stage": "load_line_items"}


def test_a_named_action_overrides_the_default(bound: BoundLogger) -> None:
    log, operation_id = bound.log, bound.operation_id
    log.log_error_with_context(
        operation_id,
        InsufficientStock([StockShortage("A", 2, 1)]),
        {"action": LogAction.OPERATION_FAILED},
    )
    assert bound.records()[0]["action"] == "operation_failed"


def test_an_unknown_action_is_refused(bound: BoundLogger) -> None:
    log, operation_id = bound.log, bound.operation_id
    with pytest.raises(ValueError, match="not_an_action"):
        log.log_action_with_timing(operation_id, "not_an_action", "nope")


def test_events_go_to_the_store_with_the_record(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, _ = captured
    store = RecordingEventStore()
    log, operation_id = bound_logger(logger, store)
    log.log_status_transition(
        operation_id, OperationStatus.PENDING, OperationStatus.FAILED, "gave up"
    )
    (event,) = store.events
    assert event["action"] == "status_transition"
    assert (event["from_status"], event["to_status"]) == ("pending", "failed")
    assert event["details"]["reason"] == "gave up"


def test_events_commit_or_roll_back_with_the_callers_transaction(
    clean_database: Database, captured: tuple[logging.Logger, io.StringIO]
) -> None:
    logger, _ = captured
    operation_id = uuid.uuid4()
    with clean_database.transaction() as session:
        session.add(PendingStockOperation(id=operation_id, order_id="o-1"))
    with clean_database.transaction() as session:
        log = StandardizedLogger(logger, SqlEventStore(session))
        log.log_status_transition(
            operation_id, OperationStatus.PENDING, OperationStatus.PROCESSING, "loaded"
        )
    with pytest.raises(RuntimeError), clean_database.transaction() as session:
        log = StandardizedLogger(logger, SqlEventStore(session))
        log.log_status_transition(
            operation_id, OperationStatus.PROCESSING, OperationStatus.FAILED, "x"
        )
        raise RuntimeError("the change failed")
    with clean_database.transaction() as session:
        actions = (
            session.execute(
                select(OperationEvent.to_status).where(OperationEvent.operation_id == operation_id)
            )
            .scalars()
            .all()
        )
    assert actions == ["processing"]


def test_measure_execution_time_reports_whole_milliseconds() -> None:
    with measure_execution_time() as timer:
        sum(range(1000))
    assert isinstance(timer.elapsed_ms, int) and timer.elapsed_ms >= 0

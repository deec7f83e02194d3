"""Property-based tests of the shop backend's API: whatever the caller passes, either the call
succeeds or it raises a documented error with a one-line message naming the argument, and a
refused call writes nothing. On real PostgreSQL, as many generated calls per property as the
hypothesis profile says."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import OperationEvent, PendingStockOperation
from stock_sync.adapters.settings import load_settings
from stock_sync.composition import Services, build_services
from stock_sync.domain.errors import CancellationRefused, InvalidInput, OperationNotFound
from stock_sync.domain.statuses import OperationStatus
from stock_sync.producer import request_cancellation, submit_operation
from stock_sync.services.cancellation_results import CancellationResult
from tests.support import RecordingDispatcher, insert_operation

CASES = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Text as callers send it: mostly printable, some hostile (NUL, surrogates, escapes, bidi).
hostile_text = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.text(alphabet=st.sampled_from("ab \t\n\x00\x1b\u202e\ud800Ł"), max_size=8),
    st.text(min_size=120, max_size=300),
    st.from_regex(r"[A-Za-z0-9-]{1,40}", fullmatch=True),
)
not_text = st.one_of(
    st.none(), st.integers(), st.floats(), st.binary(max_size=8), st.lists(st.integers())
)


@pytest.fixture
def services(clean_database: Database) -> Services:
    return build_services(
        load_settings(), database=clean_database, dispatcher=RecordingDispatcher()
    )


def rows_written(database: Database) -> tuple[int, int]:
    with database.transaction() as session:
        operations = session.scalar(select(func.count()).select_from(PendingStockOperation))
        events = session.scalar(select(func.count()).select_from(OperationEvent))
    return operations or 0, events or 0


def assert_clean_refusal(error: Exception, *names: str) -> None:
    message = str(error)
    assert "\n" not in message and "\r" not in message, message
    assert any(message.startswith(name) for name in names), message


@CASES
@given(order_id=st.one_of(hostile_text, not_text), account_name=st.one_of(hostile_text, not_text))
def test_submit_operation_succeeds_or_refuses_cleanly_writing_nothing(
    services: Services, order_id: Any, account_name: Any
) -> None:
    before = rows_written(services.database)
    try:
        operation_id = submit_operation(order_id, account_name, services=services)
    except InvalidInput as error:
        assert_clean_refusal(error, "order_id", "account_name")
        assert rows_written(services.database) == before
        return
    with services.database.transaction() as session:
        row = session.get(PendingStockOperation, operation_id)
        assert row is not None and row.order_id == order_id.strip()


@CASES
@given(
    target=st.sampled_from(["pending", "cancelled", "unknown", "garbage"]),
    garbage=st.one_of(hostile_text, not_text),
    cancelled_by=st.one_of(hostile_text, not_text),
    reason=st.one_of(hostile_text, not_text),
)
def test_request_cancellation_succeeds_or_refuses_cleanly_writing_nothing(
    services: Services, target: str, garbage: Any, cancelled_by: Any, reason: Any
) -> None:
    operation_id: Any = {
        "pending": lambda: insert_operation(services.database),
        "cancelled": lambda: _cancelled_operation(services),
        "unknown": uuid.uuid4,
        "garbage": lambda: garbage,
    }[target]()
    before = rows_written(services.database)
    try:
        result = request_cancellation(operation_id, cancelled_by, reason, services=services)
    except InvalidInput as error:
        assert_clean_refusal(error, "operation_id", "cancelled_by", "reason")
        assert rows_written(services.database) == before
        return
    except (OperationNotFound, CancellationRefused) as error:
        assert target in ("unknown", "garbage") and "\n" not in str(error)
        assert rows_written(services.database) == before
        return
    assert isinstance(result, CancellationResult)
    assert result.final_status is OperationStatus.CANCELLED


def _cancelled_operation(services: Services) -> uuid.UUID:
    operation_id = insert_operation(services.database)
    services.cancellation.cancel_operation(operation_id, "first", "already cancelled")
    return operation_id

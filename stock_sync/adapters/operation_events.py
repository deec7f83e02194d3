"""The operation event table: the audit trail behind ``show`` timelines and the metrics."""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Iterable
from typing import Any
from uuid import UUID

from sqlalchemy import Connection, bindparam, insert, select, text
from sqlalchemy.orm import Session

from stock_sync.adapters.db import TransactionOwner, before_commit
from stock_sync.adapters.models import (
    COUNTER_SHARDS,
    METRIC_COUNTERS_TABLE,
    OPERATION_EVENTS_TABLE,
    OperationEvent,
    utcnow,
)
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.settlement import (
    COMPLETED,
    OPERATION_TYPE_KEY,
    PROCESSING_KEY,
    processing_bucket,
    settled_outcome,
)
from stock_sync.domain.statuses import OperationStatus

_PENDING_EVENTS = "stock_sync.pending_events"
_INSERT_EVENTS = insert(OPERATION_EVENTS_TABLE)
# The counters of stock_sync.services.metrics (table metric_counters), by (name, label).
CREATED_COUNTER = "operations_created"
FINISHED_COUNTER = "operations_finished"
ERRORS_COUNTER = "errors"
RETRIED_COUNTER = "operations_retried"
# Order deductions by how their processing ended (stock_sync/domain/settlement.py), and the
# processing-time histogram of the completed ones: one row per bucket (not cumulative: a
# completion raises one row; the exposition sums them up) and the sum in milliseconds.
SETTLED_COUNTER = "order_deductions_settled"
PROCESSING_BUCKET_COUNTER = "processing_seconds_bucket"
PROCESSING_SUM_MS_COUNTER = "processing_milliseconds_sum"
_FINAL_STATUSES = frozenset(
    status.value
    for status in (OperationStatus.COMPLETED, OperationStatus.FAILED, OperationStatus.CANCELLED)
)


class _EventRows:
    """An event store that keeps each recorded event as a row of the event table (``_keep``
    says where the row waits to be written)."""

    def record(self, **event: Any) -> None:
        """One event: operation_id, action, from_status, to_status, error_type and details
        (services.standardized_logger.EventStore types them), stamped with the time now."""
        self._keep({**event, "at": utcnow()})

    def _keep(self, row: dict[str, Any]) -> None:
        raise NotImplementedError


class SqlEventStore(_EventRows):
    """Writes audit events into the current transaction of a Session or a Connection (never
    commits).

    Events are buffered and written as one multi-row INSERT just before the transaction
    commits (a stage writes several: one statement instead of one per event). They commit,
    or roll back, with the change they record.
    """

    def __init__(self, owner: TransactionOwner) -> None:
        self._owner = owner

    def _keep(self, row: dict[str, Any]) -> None:
        pending_events(self._owner).append(row)


class DeferredEvents(_EventRows):
    """Events of a step that ran outside any transaction (a lock-free check, an HTTP call),
    kept until the transaction that records its outcome writes them, in order, first."""

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []

    def _keep(self, row: dict[str, Any]) -> None:
        self._events.append(row)

    def write_into(self, owner: TransactionOwner) -> None:
        pending_events(owner).extend(self._events)
        self._events = []


def pending_events(owner: TransactionOwner) -> list[dict[str, Any]]:
    """The events waiting to be written by ``owner``'s transaction (registering the write
    before its commit the first time)."""
    pending: list[dict[str, Any]] | None = owner.info.get(_PENDING_EVENTS)
    if pending is None:
        pending = owner.info[_PENDING_EVENTS] = []
        before_commit(owner, lambda: _write_pending_events(owner))
    return pending


def _write_pending_events(owner: TransactionOwner) -> None:
    """One INSERT for the events of the transaction, after the rows they refer to."""
    pending = owner.info.pop(_PENDING_EVENTS, None)
    if not pending:
        return
    if isinstance(owner, Session):
        owner.flush()  # a new operation row must exist before its events point at it
        owner = owner.connection()
    increments = counter_increments(pending)
    if increments and owner.dialect.name == "postgresql":
        # one round trip: the events' INSERT rides in the counters' upsert as a CTE
        parameters = _counter_parameters(increments)
        for index, event in enumerate(pending):
            parameters.update({f"{name}_e{index}": value for name, value in event.items()})
        owner.execute(_events_and_counters(len(pending), len(increments)), parameters)
        return
    owner.execute(_INSERT_EVENTS, pending)
    _raise_counters(owner, increments)


_EVENT_COLUMNS = (
    "operation_id",
    "action",
    "from_status",
    "to_status",
    "error_type",
    "details",
    "at",
)
_COUNTER_COLUMNS = ("name", "label", "shard", "value")


def _rows_sql(columns: tuple[str, ...], suffixes: Iterable[str]) -> str:
    return ", ".join(
        "(" + ", ".join(f":{column}_{suffix}" for column in columns) + ")" for suffix in suffixes
    )


def _typed(table: Any, columns: tuple[str, ...], suffixes: Iterable[str]) -> list[Any]:
    return [
        bindparam(f"{column}_{suffix}", type_=table.c[column].type)
        for suffix in suffixes
        for column in columns
    ]


# Multi-row Core INSERTs have no SQL cache key: SQLAlchemy compiled them again on every call
# (three times the CPU of the statement itself). Their text, built once per size, is cached.
_COUNTER_UPSERT_SQL = (
    "INSERT INTO metric_counters (name, label, shard, value) VALUES {rows} "
    "ON CONFLICT (name, label, shard) DO UPDATE SET value = metric_counters.value + excluded.value"
)


@functools.lru_cache(maxsize=64)
def _events_and_counters(events: int, counters: int) -> Any:
    """PostgreSQL: ``WITH written_events AS (INSERT INTO operation_events ...) INSERT INTO
    metric_counters ... ON CONFLICT DO UPDATE``: ``events`` events and ``counters`` counter
    rows in one statement, built once per size."""
    event_suffixes = [f"e{index}" for index in range(events)]
    counter_suffixes = [str(index) for index in range(counters)]
    sql = (
        "WITH written_events AS (INSERT INTO operation_events ("
        + ", ".join(_EVENT_COLUMNS)
        + ") VALUES "
        + _rows_sql(_EVENT_COLUMNS, event_suffixes)
        + ") "
        + _COUNTER_UPSERT_SQL.format(rows=_rows_sql(_COUNTER_COLUMNS, counter_suffixes))
    )
    return text(sql).bindparams(
        *_typed(OPERATION_EVENTS_TABLE, _EVENT_COLUMNS, event_suffixes),
        *_typed(METRIC_COUNTERS_TABLE, _COUNTER_COLUMNS, counter_suffixes),
    )


def counter_increments(events: Iterable[dict[str, Any]]) -> Counter[tuple[str, str]]:
    """What ``events`` add to each (counter, label) of ``metric_counters``."""
    increments: Counter[tuple[str, str]] = Counter()
    for event in events:
        if event["action"] == LogAction.OPERATION_CREATED.value:
            increments[(CREATED_COUNTER, "")] += 1
        if event["action"] == LogAction.OPERATION_RETRIED.value:
            increments[(RETRIED_COUNTER, "")] += 1
        if event["to_status"] in _FINAL_STATUSES:
            increments[(FINISHED_COUNTER, event["to_status"])] += 1
        if event["error_type"]:
            increments[(ERRORS_COUNTER, event["error_type"][:64])] += 1
        _count_settlement(increments, event)
    return increments


def _count_settlement(increments: Counter[tuple[str, str]], event: dict[str, Any]) -> None:
    """A transition that settles an order deduction: its outcome, and a completion's
    processing time (both carried by the transition event's details)."""
    details = event["details"] or {}
    outcome = settled_outcome(details.get(OPERATION_TYPE_KEY), event["to_status"])
    if outcome is None:
        return
    increments[(SETTLED_COUNTER, outcome)] += 1
    seconds = details.get(PROCESSING_KEY)
    if outcome == COMPLETED and isinstance(seconds, int | float):
        increments[(PROCESSING_BUCKET_COUNTER, processing_bucket(seconds))] += 1
        increments[(PROCESSING_SUM_MS_COUNTER, "")] += round(seconds * 1000)


@functools.lru_cache(maxsize=32)
def _counter_upsert(rows: int) -> Any:
    """The upsert of ``rows`` counter rows (PostgreSQL and SQLite spell it alike), built once
    per size."""
    suffixes = [str(index) for index in range(rows)]
    return text(_COUNTER_UPSERT_SQL.format(rows=_rows_sql(_COUNTER_COLUMNS, suffixes))).bindparams(
        *_typed(METRIC_COUNTERS_TABLE, _COUNTER_COLUMNS, suffixes)
    )


def _raise_counters(connection: Connection, increments: Counter[tuple[str, str]]) -> None:
    """One multi-row upsert (one round trip however many counters an event raises), its rows
    in key order: concurrent transactions lock the counter rows in one order."""
    if not increments:
        return
    connection.execute(_counter_upsert(len(increments)), _counter_parameters(increments))


def _counter_parameters(increments: Counter[tuple[str, str]]) -> dict[str, Any]:
    """The upsert's parameters, its rows in key order: concurrent transactions lock the
    counter rows in one order."""
    shard = os.getpid() % COUNTER_SHARDS  # this process's own rows: see MetricCounter
    parameters: dict[str, Any] = {}
    for index, ((name, label), value) in enumerate(sorted(increments.items())):
        parameters.update({f"name_{index}": name, f"label_{index}": label, f"shard_{index}": shard})
        parameters[f"value_{index}"] = value
    return parameters


def timeline(session: Session, operation_id: UUID) -> list[OperationEvent]:
    """Every event of an operation, oldest first."""
    return list(
        session.scalars(
            select(OperationEvent)
            .where(OperationEvent.operation_id == operation_id)
            .order_by(OperationEvent.id)
        )
    )

"""Helpers for the end-to-end tests: submit orders, wait for statuses, read what happened."""

from __future__ import annotations

import gzip
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from celery.signals import task_postrun
from sqlalchemy import Select, func, select, text

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import OperationEvent, PendingStockOperation, StockMovement
from stock_sync.adapters.stock_ledger import get_stock, ledger_sum, set_stock
from stock_sync.domain.statuses import TERMINAL_STATUSES, OperationStatus
from stock_sync.producer import submit_operation
from stock_sync.services.standardized_logger import OPERATIONS_LOGGER
from stock_sync_fake import FakeMicroservice

Row = TypeVar("Row")
TERMINAL = {status.value for status in TERMINAL_STATUSES}
WAIT_S = 60.0


class RecordingHandler(logging.Handler):
    """Keeps every record of the operations logger, as the dict the JSON formatter prints."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def capture_operation_logs(name: str = OPERATIONS_LOGGER) -> Iterator[list[logging.LogRecord]]:
    """Every record of the logger ``name`` (default: the operations logger) while inside."""
    handler = RecordingHandler()
    logger = logging.getLogger(name)
    previous_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


PostHandler = Callable[[str, Message, bytes], int]


@contextmanager
def receiving_posts(
    handle: PostHandler, answer_headers: dict[str, str] | None = None
) -> Iterator[int]:
    """An HTTP server on 127.0.0.1 (its port yielded) that hands every POST to ``handle`` as
    (path, headers, body, ungzipped when its Content-Encoding says gzip) and answers the
    status ``handle`` returns, with ``answer_headers`` and an empty body."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            self.send_response(handle(self.path, self.headers, body))
            for name, value in (answer_headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def bare_root_logger() -> Iterator[logging.Logger]:
    """The root logger without pytest's capturing handlers, as in a `stock-sync` process
    (pytest adds them again for each phase of a test, so this runs inside the test body)."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    for handler in saved_handlers:
        root.removeHandler(handler)
    try:
        yield root
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)


def wait_for_record(
    records: list[logging.LogRecord],
    matches: Callable[[logging.LogRecord], bool],
    timeout_s: float = WAIT_S,
) -> logging.LogRecord:
    """The first captured record that ``matches``, waiting for it (proof that an event
    happened, before a test checks that what it follows did not)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for record in list(records):
            if matches(record):
                return record
        assert time.monotonic() < deadline, f"no matching record in {timeout_s}s"
        time.sleep(0.02)


@dataclass(frozen=True)
class TaskRun:
    """One run of a task by the in-process worker, seen as it ended."""

    task_id: str
    name: str
    args: tuple[Any, ...]
    state: str  # SUCCESS; RETRY when the run scheduled another of the same task id


class TaskRuns:
    """Every task run the in-process worker ends while recording (Celery's task_postrun
    signal, sent from the worker's thread): the proof that a message was consumed."""

    def __init__(self) -> None:
        self._runs: list[TaskRun] = []
        self._changed = threading.Condition()

    def _record(self, task_id: str, task: Any, args: Any, state: str, **_: Any) -> None:
        with self._changed:
            self._runs.append(TaskRun(task_id, task.name, tuple(args or ()), state))
            self._changed.notify_all()

    @contextmanager
    def recording(self) -> Iterator[TaskRuns]:
        task_postrun.connect(self._record, weak=False)
        try:
            yield self
        finally:
            task_postrun.disconnect(self._record)

    def wait_for_end(self, task_ids: Iterable[str], timeout_s: float = WAIT_S) -> list[TaskRun]:
        """The last run of each task id, once each ended without scheduling another."""
        wanted = list(task_ids)

        def ends() -> dict[str, TaskRun]:
            return {r.task_id: r for r in self._runs if r.task_id in wanted and r.state != "RETRY"}

        with self._changed:
            if not self._changed.wait_for(lambda: len(ends()) == len(set(wanted)), timeout_s):
                raise AssertionError(f"tasks {wanted} did not end in {timeout_s}s: {self._runs}")
            found = ends()
        return [found[task_id] for task_id in wanted]

    def wait_for_chain_end(
        self, task_name: str, operation_id: uuid.UUID, timeout_s: float = WAIT_S
    ) -> TaskRun:
        """The first run of ``task_name`` for ``operation_id`` that scheduled no other run:
        the operation's chain, retrying that stage, has no message left."""

        def end() -> TaskRun | None:
            return next(
                (
                    r
                    for r in self._runs
                    if r.name == task_name
                    and r.args[:1] == (str(operation_id),)
                    and r.state != "RETRY"
                ),
                None,
            )

        with self._changed:
            if not self._changed.wait_for(lambda: end() is not None, timeout_s):
                raise AssertionError(f"no run of {task_name} for {operation_id} ended its chain")
            found = end()
        assert found is not None
        return found


def order(
    order_id: str, *lines: tuple[str, int], account_name: str | None = "shop-1", **extra: Any
) -> dict[str, Any]:
    """An order for the fake microservice: (sku, quantity) per line."""
    return {
        "id": order_id,
        "account_name": account_name,
        "status": "READY_FOR_PROCESSING",
        "fulfillment_status": "NEW",
        "line_items": [
            {
                "id": f"{order_id}-line-{index}",
                "offer_id": f"offer-{sku}",
                "sku": sku,
                "quantity": quantity,
            }
            for index, (sku, quantity) in enumerate(lines, start=1)
        ],
        **extra,
    }


@dataclass
class Pipeline:
    database: Database
    fake: FakeMicroservice
    log_records: list[logging.LogRecord] = field(default_factory=list)
    task_runs: TaskRuns = field(default_factory=TaskRuns)

    def submit(self, an_order: dict[str, Any], **fake_options: Any) -> uuid.UUID:
        """Give the fake ``an_order`` (``fake_options``: its faults, when it becomes ready...)
        and submit it as a producer does; the operation's id."""
        self.fake.add_order(an_order, **fake_options)
        return submit_operation(an_order["id"])

    def set_stock(self, **levels: int) -> None:
        with self.database.transaction() as session:
            for sku, quantity in levels.items():
                set_stock(session, sku, quantity)

    def stock(self, sku: str) -> int | None:
        with self.database.transaction() as session:
            return get_stock(session, sku)

    def ledger_matches_stock(self, sku: str) -> bool:
        with self.database.transaction() as session:
            return ledger_sum(session, sku) == get_stock(session, sku)

    def operation(self, operation_id: uuid.UUID) -> PendingStockOperation:
        with self.database.transaction() as session:
            row = session.get(PendingStockOperation, operation_id)
            assert row is not None
            return row

    def wait_for(
        self,
        operation_ids: Iterable[uuid.UUID],
        condition: Callable[[PendingStockOperation], bool] = lambda op: op.status in TERMINAL,
        timeout_s: float = WAIT_S,
    ) -> list[PendingStockOperation]:
        """Poll until every operation meets ``condition``; fail with their states if not."""
        ids = list(operation_ids)
        deadline = time.monotonic() + timeout_s
        while True:
            rows = [self.operation(i) for i in ids]
            if all(condition(row) for row in rows):
                return rows
            if time.monotonic() > deadline:
                states = {str(r.id)[:8]: (r.status, r.retry_count, r.last_error) for r in rows}
                raise AssertionError(f"operations did not settle in {timeout_s}s: {states}")
            time.sleep(0.05)

    def wait_for_status(
        self, operation_id: uuid.UUID, status: OperationStatus
    ) -> PendingStockOperation:
        (row,) = self.wait_for([operation_id], lambda op: op.status == status.value)
        return row

    def rows(self, statement: Select[tuple[Row]]) -> list[Row]:
        """The rows ``statement`` selects, read in a transaction of their own."""
        with self.database.transaction() as session:
            return list(session.scalars(statement))

    def events(self, operation_id: uuid.UUID) -> list[OperationEvent]:
        return self.rows(
            select(OperationEvent)
            .where(OperationEvent.operation_id == operation_id)
            .order_by(OperationEvent.id)
        )

    def actions(self, operation_id: uuid.UUID) -> list[str]:
        return [event.action for event in self.events(operation_id)]

    def logged_actions(self, operation_id: uuid.UUID) -> list[str]:
        return [
            r.action
            for r in self.log_records
            if getattr(r, "operation_id", None) == str(operation_id)
        ]  # type: ignore[attr-defined]

    def movements(self, operation_id: uuid.UUID) -> list[tuple[str, int, str]]:
        with self.database.transaction() as session:
            rows = session.scalars(
                select(StockMovement)
                .where(StockMovement.operation_id == operation_id)
                .order_by(StockMovement.id)
            )
            return [(row.sku, row.delta, row.reason) for row in rows]

    def count_operations(self, status: OperationStatus) -> int:
        with self.database.transaction() as session:
            return (
                session.scalar(
                    select(func.count())
                    .select_from(PendingStockOperation)
                    .where(PendingStockOperation.status == status.value)
                )
                or 0
            )

    def applied_puts(self, order_id: str) -> list[dict[str, Any]]:
        return [
            r
            for r in self.fake.fulfillment_requests()
            if r["order_id"] == order_id and r["outcome"] == "applied"
        ]


def insert_operation(
    database: Database,
    *,
    order_id: str | None = None,
    status: OperationStatus | str = OperationStatus.PENDING,
    lines: Iterable[tuple[str, int]] = (),
    **fields: Any,
) -> uuid.UUID:
    """An operation row as a stage (or time) would have left it, with no message on the broker.

    ``lines`` are (sku, quantity); ``fields`` set any other column (timestamps, retry_count...).
    """
    operation_id = uuid.uuid4()
    order_id = order_id or f"order-{operation_id.hex[:12]}"
    with database.transaction() as session:
        session.add(
            PendingStockOperation(
                id=operation_id,
                order_id=order_id,
                account_name=fields.pop("account_name", "shop-1"),
                status=OperationStatus(status).value,
                line_items=[
                    {"id": f"{order_id}-{i}", "offer_id": "o", "sku": sku, "quantity": qty}
                    for i, (sku, qty) in enumerate(lines)
                ],
                **fields,
            )
        )
    return operation_id


def wait_for_lock_waiters(database: Database, count: int, timeout_s: float = 30.0) -> None:
    """Block until ``count`` sessions of the database wait for a lock (a forced interleaving)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with database.engine.connect() as connection:
            waiting = connection.execute(
                text(
                    "select count(*) from pg_stat_activity"
                    " where datname = current_database() and wait_event_type = 'Lock'"
                )
            ).scalar()
        if waiting is not None and waiting >= count:
            return
        assert time.monotonic() < deadline, f"{count} lock waiters never showed up"
        time.sleep(0.02)


class RecordingDispatcher:
    """The services' Dispatcher port with no broker behind it: remembers what it was asked to
    enqueue (``pipelines`` as (operation, status), the generation of each in
    ``generations``)."""

    def __init__(self) -> None:
        self.pipelines: list[tuple[uuid.UUID, OperationStatus]] = []
        self.rollbacks: list[uuid.UUID] = []
        self.probes: list[int] = []
        self.generations: dict[uuid.UUID, int] = {}
        self._lock = threading.Lock()

    def enqueue_pipeline(
        self, operation_id: uuid.UUID, status: OperationStatus, generation: int
    ) -> None:
        with self._lock:
            self.pipelines.append((operation_id, status))
            self.generations[operation_id] = generation

    def enqueue_pipelines(
        self,
        dispatches: Sequence[tuple[uuid.UUID, OperationStatus, int]],
        on_published: Callable[[int], None] | None = None,
    ) -> None:
        for published, dispatch in enumerate(dispatches, start=1):
            self.enqueue_pipeline(*dispatch)
            if on_published is not None:
                on_published(published)

    def enqueue_rollback(self, adjustment_operation_id: uuid.UUID, generation: int) -> None:
        with self._lock:
            self.rollbacks.append(adjustment_operation_id)
            self.generations[adjustment_operation_id] = generation

    def enqueue_probe(self, probe_id: int) -> None:
        with self._lock:
            self.probes.append(probe_id)

"""The monitoring metrics on a known set of operations: the query, the Prometheus exposition,
the metrics server over real HTTP, the scrape cache and ``stock-sync stats``."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from stock_sync.adapters import operation_events, schema
from stock_sync.adapters.db import Database
from stock_sync.adapters.maintenance_runs import (
    RECONCILE,
    SWEEP,
    last_runs,
    record_beat_send,
    recorded_run,
)
from stock_sync.adapters.models import COUNTER_SHARDS, MetricCounter, OperationEvent
from stock_sync.adapters.operation_events import SqlEventStore
from stock_sync.adapters.probes import queue_length
from stock_sync.adapters.settings import Settings
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.statuses import OperationType
from stock_sync.entrypoints.metrics_exposition import CachedProbe, MetricsCache, render_prometheus
from stock_sync.entrypoints.metrics_server import (
    IDLE_TIMEOUT_S,
    MetricsServer,
    make_metrics_server,
    metrics_registry,
    metrics_server_app,
)
from stock_sync.services.health import microservice_up
from stock_sync.services.metric_reads import counter_values, percentile_cont
from stock_sync.services.metrics import (
    KNOWN_ERROR_TYPES,
    MetricsSnapshot,
    collect_metrics,
    read_metrics,
)
from tests.conftest import REDIS_URL, run_queue_name
from tests.promtool import check_metrics
from tests.support import insert_operation

CLI = str(Path(sys.executable).with_name("stock-sync"))
WINDOW_S = 3600.0
STUCK_AFTER_S = 900.0
SETTINGS = Settings(alert_window_s=WINDOW_S, stuck_after_s=STUCK_AFTER_S, metrics_cache_s=60)
ORDER_DEDUCTION = OperationType.ORDER_DEDUCTION.value
STOCK_RESTORATION = OperationType.STOCK_RESTORATION.value


def ago(now: datetime, seconds: float) -> datetime:
    return now - timedelta(seconds=seconds)


@dataclass
class KnownOperations:
    """The dataset below and the ids the figures must name."""

    database: Database
    now: datetime
    slowest_first: list[str]
    stuck_oldest_first: list[str]
    failed: list[str]
    cancelled_newest_first: list[str]


def add_operation(
    database: Database,
    status: str,
    *,
    created: datetime,
    updated: datetime,
    completed: datetime | None = None,
    failed: datetime | None = None,
    next_retry_at: datetime | None = None,
    operation_type: str = ORDER_DEDUCTION,
    started: datetime | None = None,
) -> str:
    """A row last changed at ``updated``: a live one was dispatched then (``started``: its
    attempt began then and never ended; ``next_retry_at``: its retry is parked)."""
    live = status in ("pending", "processing", "stock_deducted")
    operation_id = insert_operation(
        database,
        status=status,
        operation_type=operation_type,
        created_at=created,
        updated_at=updated,
        completed_at=completed,
        failed_at=failed,
        next_retry_at=next_retry_at,
        dispatched_at=updated if live and next_retry_at is None else None,
        attempt_started_at=started,
    )
    return str(operation_id)


def add_error_events(
    database: Database, operation_id: str, *events: tuple[str | None, datetime]
) -> None:
    with database.transaction() as session:
        for error_type, at in events:
            session.add(
                OperationEvent(
                    operation_id=uuid.UUID(operation_id),
                    action="STOCK_DEDUCTION_FAILED" if error_type else "STATUS_CHANGED",
                    error_type=error_type,
                    details={},
                    at=at,
                )
            )


def insert_known_operations(database: Database, now: datetime) -> KnownOperations:
    """Every figure of this set is worked out below it (window 3600 s, stuck after 900 s)."""

    def add(status: str, created_ago: float, updated_ago: float, **extra: object) -> str:
        return add_operation(
            database,
            status,
            created=ago(now, created_ago),
            updated=ago(now, updated_ago),
            **extra,  # type: ignore[arg-type]
        )

    # live: pending 4 (one an adjustment), processing 1, stock_deducted 0; stuck: attempts
    # that started long ago and never ended (no probe has come through: none is lost)
    add("pending", 60, 60)  # waiting in the queue
    stuck_pending = add("pending", 2000, 2000, started=ago(now, 2000))
    add("pending", 3000, 2000, next_retry_at=ago(now, -60))  # silent, but a retry is parked
    stuck_processing = add("processing", 1100, 1000, started=ago(now, 1000))
    stuck_adjustment = add(
        "pending", 5000, 5000, operation_type=STOCK_RESTORATION, started=ago(now, 5000)
    )

    # completed in the window after 10, 20, 30 and 100 s; one long before; one adjustment
    completed = [
        add("completed", 600 + seconds, 600, completed=ago(now, 600)) for seconds in (10, 20, 30)
    ]
    slowest = add("completed", 700, 600, completed=ago(now, 600))
    add("completed", 12200, 7200, completed=ago(now, 7200))
    add("completed", 20000, 10, completed=ago(now, 10), operation_type=STOCK_RESTORATION)

    failed = add("failed", 400, 300, failed=ago(now, 300))
    add("failed", 4100, 4000, failed=ago(now, 4000))  # before the window
    cancelled = add("cancelled", 200, 100)
    cancelled_older = add("cancelled", 5000, 50)  # created before the window, cancelled in it

    add_error_events(
        database,
        failed,
        ("MicroserviceUnavailable", ago(now, 100)),
        ("MicroserviceUnavailable", ago(now, 150)),
        ("InsufficientStock", ago(now, 200)),
        ("MicroserviceUnavailable", ago(now, 4000)),  # before the window
        (None, ago(now, 100)),  # not an error
    )
    return KnownOperations(
        database=database,
        now=now,
        slowest_first=[slowest, *reversed(completed)],
        stuck_oldest_first=[stuck_adjustment, stuck_pending, stuck_processing],
        failed=[failed],
        cancelled_newest_first=[cancelled_older, cancelled],
    )


# The figures of the set above, worked out by hand (window 3600 s, stuck after 900 s).
LIVE = {"pending": 4, "processing": 1, "stock_deducted": 0}
FINISHED = {"completed": 4, "failed": 1, "cancelled": 2}
CREATED = 10  # 4 live + 4 completed + 1 failed + 1 cancelled order deductions in the window
PROCESSING_AVG_S = 40.0  # (10 + 20 + 30 + 100) / 4
PROCESSING_P95_S = 89.5  # rank 0.95 * 3 = 2.85: 30 + 0.85 * (100 - 30)
ERRORS = {"InsufficientStock": 1, "MicroserviceUnavailable": 2}
ERROR_RATIO = 0.2  # 1 failed / (4 completed + 1 failed)
CANCELLATIONS = 2
CANCELLATION_RATIO = 0.2  # 2 cancelled / 10 created
STUCK = 3
WAITING = 1  # the fresh pending one: its message waits in the queue
PARKED = 1  # the silent pending one with a retry due in a minute


@pytest.fixture(params=["postgresql", "sqlite"])
def any_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """The same figures must come out of PostgreSQL and of the embedded SQLite default."""
    if request.param == "postgresql":
        yield request.getfixturevalue("clean_database")
        return
    url = f"sqlite:///{tmp_path / 'metrics.sqlite3'}"
    schema.upgrade(url)
    database = Database(url)
    yield database
    database.dispose()


@pytest.fixture
def known(clean_database: Database) -> KnownOperations:
    return insert_known_operations(clean_database, datetime.now(UTC))


def assert_known_figures(figures: dict[str, Any]) -> None:
    """``figures`` is MetricsSnapshot.to_dict() of the known set, or its JSON."""
    assert figures["operations"] == LIVE
    assert figures["finished"] == FINISHED
    assert figures["created"] == CREATED
    assert figures["processing_seconds"]["count"] == 4
    assert figures["processing_seconds"]["avg"] == pytest.approx(PROCESSING_AVG_S)
    assert figures["processing_seconds"]["p95"] == pytest.approx(PROCESSING_P95_S)
    assert figures["errors"] == ERRORS
    assert figures["error_ratio"] == pytest.approx(ERROR_RATIO)
    assert figures["cancellations"] == CANCELLATIONS
    assert figures["cancellation_ratio"] == pytest.approx(CANCELLATION_RATIO)
    assert figures["stuck"]["count"] == STUCK
    assert (figures["waiting"], figures["parked_retries"]) == (WAITING, PARKED)
    assert figures["window_s"] == WINDOW_S


# --- the figures ------------------------------------------------------------------------------


def test_the_figures_match_a_known_set_of_operations(any_database: Database) -> None:
    known = insert_known_operations(any_database, datetime.now(UTC))

    snapshot = read_metrics(any_database, SETTINGS, now=known.now)

    assert_known_figures(snapshot.to_dict())
    assert list(snapshot.slowest_operation_ids) == known.slowest_first
    assert list(snapshot.stuck_sample_ids) == known.stuck_oldest_first
    assert list(snapshot.failed_sample_ids) == known.failed
    assert list(snapshot.cancelled_sample_ids) == known.cancelled_newest_first
    assert snapshot.queue_length is None and snapshot.to_dict()["queue"] is None


def test_an_empty_database_gives_zeros_and_every_status(clean_database: Database) -> None:
    snapshot = read_metrics(clean_database, SETTINGS, now=datetime.now(UTC))

    figures = snapshot.to_dict()
    assert figures["operations"] == {"pending": 0, "processing": 0, "stock_deducted": 0}
    assert figures["finished"] == {"completed": 0, "failed": 0, "cancelled": 0}
    assert figures["processing_seconds"] == {
        "count": 0,
        "avg": 0.0,
        "p95": 0.0,
        "slowest_operation_ids": [],
    }
    assert figures["error_ratio"] == 0.0 and figures["cancellation_ratio"] == 0.0
    assert figures["errors"] == {} and figures["stuck"] == {"count": 0, "sample_operation_ids": []}


def test_a_known_queue_length_is_reported_under_the_queue_name(clean_database: Database) -> None:
    with clean_database.transaction() as session:
        snapshot = collect_metrics(session, SETTINGS, now=datetime.now(UTC), queue_length=7)

    assert snapshot.to_dict()["queue"] == {"name": SETTINGS.queue_name, "length": 7}


def test_stuck_samples_stop_at_ten(clean_database: Database) -> None:
    now = datetime.now(UTC)
    for _ in range(12):
        add_operation(
            clean_database,
            "processing",
            created=ago(now, 2000),
            updated=ago(now, 2000),
            started=ago(now, 2000),
        )

    snapshot = read_metrics(clean_database, SETTINGS, now=now)

    assert snapshot.stuck_count == 12 and len(snapshot.stuck_sample_ids) == 10


@pytest.mark.parametrize(
    ("values", "expected"),
    [([], 0.0), ([5.0], 5.0), ([1.0, 2.0], 1.95), ([10.0, 100.0, 20.0, 30.0], 89.5)],
)
def test_the_python_percentile_interpolates_like_postgresql(
    values: list[float], expected: float
) -> None:
    assert percentile_cont(values, 0.95) == pytest.approx(expected)


# --- Prometheus ---------------------------------------------------------------------------------


def parse_exposition(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def assert_known_exposition(text: str) -> None:
    samples = parse_exposition(text)
    for status, count in LIVE.items():
        assert samples[("stock_sync_operations", (("status", status),))] == count
    assert samples[("stock_sync_stuck_operations", ())] == STUCK
    assert samples[("stock_sync_metrics_window_seconds", ())] == WINDOW_S
    assert samples[("stock_sync_database_up", ())] == 1
    # The known set was inserted without events: every counter is there, at zero.
    for status in FINISHED:
        assert samples[("stock_sync_operations_finished_total", (("status", status),))] == 0
    for error_type in KNOWN_ERROR_TYPES:
        assert samples[("stock_sync_errors_total", (("error_type", error_type),))] == 0
    assert samples[("stock_sync_operations_created_total", ())] == 0
    assert samples[("stock_sync_cancellations_total", ())] == 0
    for outcome in ("completed", "failed"):
        assert samples[("stock_sync_order_deductions_settled_total", (("outcome", outcome),))] == 0
    for bound in ("1", "300", "3600", "+Inf"):
        assert samples[("stock_sync_processing_seconds_bucket", (("le", bound),))] == 0
    assert samples[("stock_sync_processing_seconds_count", ())] == 0


def test_the_exposition_parses_and_carries_the_figures(known: KnownOperations) -> None:
    text = render_prometheus(read_metrics(known.database, SETTINGS, now=known.now, queue_length=5))

    assert_known_exposition(text)
    samples = parse_exposition(text)
    assert samples[("stock_sync_queue_length", (("queue", SETTINGS.queue_name),))] == 5
    assert "# HELP stock_sync_operations " in text
    assert "# TYPE stock_sync_stuck_operations gauge" in text
    assert "# TYPE stock_sync_operations_finished_total counter" in text
    assert "# TYPE stock_sync_errors_total counter" in text
    build = [key for key in samples if key[0] == "stock_sync_build_info"]
    assert len(build) == 1 and dict(build[0][1])["python_version"].startswith("3.")


def record_events(database: Database, *events: tuple[str, str | None, str | None]) -> None:
    """(action, to_status, error_type) events of one new operation, in one transaction."""
    now = datetime.now(UTC)
    operation_id = uuid.UUID(add_operation(database, "pending", created=now, updated=now))
    with database.transaction() as session:
        store = SqlEventStore(session)
        for action, to_status, error_type in events:
            store.record(
                operation_id=operation_id,
                action=action,
                from_status=None,
                to_status=to_status,
                error_type=error_type,
                details={},
            )


def test_events_raise_the_cumulative_counters_they_are_written_with(
    any_database: Database,
) -> None:
    created = (LogAction.OPERATION_CREATED.value, "pending", None)
    completed = ("status_changed", "completed", None)
    failed = (LogAction.OPERATION_FAILED.value, "failed", "InsufficientStock")
    record_events(any_database, created, completed)
    record_events(any_database, created, failed, ("stock_deduction_failed", None, "UnknownSku"))
    record_events(any_database, created, ("status_changed", "cancelled", None))

    snapshot = read_metrics(any_database, SETTINGS, now=datetime.now(UTC))
    # These transitions name no operation type: none of them settled an order deduction.
    assert dict(snapshot.settled_total) == {}

    assert snapshot.created_total == 3
    assert dict(snapshot.finished_total) == {"completed": 1, "failed": 1, "cancelled": 1}
    assert dict(snapshot.errors_total) == {"InsufficientStock": 1, "UnknownSku": 1}
    samples = parse_exposition(render_prometheus(snapshot))
    assert samples[("stock_sync_operations_created_total", ())] == 3
    assert samples[("stock_sync_errors_total", (("error_type", "UnknownSku"),))] == 1
    assert samples[("stock_sync_errors_total", (("error_type", "OrderNotFound"),))] == 0


def record_transitions(database: Database, *moves: tuple[str, str, dict[str, Any]]) -> None:
    """(operation_type, to_status, details) transition events, one operation each."""
    now = datetime.now(UTC)
    for operation_type, to_status, details in moves:
        added = add_operation(
            database, to_status, created=now, updated=now, operation_type=operation_type
        )
        operation_id = uuid.UUID(added)
        with database.transaction() as session:
            SqlEventStore(session).record(
                operation_id=operation_id,
                action=LogAction.STATUS_TRANSITION.value,
                from_status="stock_deducted",
                to_status=to_status,
                error_type=None,
                details={"reason": "test", "operation_type": operation_type, **details},
            )


def test_settling_transitions_raise_the_settled_counters_and_the_histogram(
    any_database: Database,
) -> None:
    record_transitions(
        any_database,
        (ORDER_DEDUCTION, "completed", {"processing_s": 0.4}),
        (ORDER_DEDUCTION, "completed", {"processing_s": 300.0}),  # on a bound: its bucket
        (ORDER_DEDUCTION, "completed", {"processing_s": 7200.5}),
        (ORDER_DEDUCTION, "failed", {}),
        (ORDER_DEDUCTION, "cancelled", {}),  # settles nothing
        (STOCK_RESTORATION, "completed", {"processing_s": 1.0}),  # an adjustment never settles
    )

    snapshot = read_metrics(any_database, SETTINGS, now=datetime.now(UTC))

    assert dict(snapshot.settled_total) == {"completed": 3, "failed": 1}
    samples = parse_exposition(render_prometheus(snapshot))
    buckets = {
        dict(labels)["le"]: value
        for (name, labels), value in samples.items()
        if name == "stock_sync_processing_seconds_bucket"
    }
    assert buckets == {
        "1": 1, "2.5": 1, "5": 1, "10": 1, "30": 1, "60": 1, "120": 1,
        "300": 2, "600": 2, "1800": 2, "3600": 2, "+Inf": 3,
    }  # fmt: skip
    assert samples[("stock_sync_processing_seconds_count", ())] == 3
    assert samples[("stock_sync_processing_seconds_sum", ())] == pytest.approx(7500.9)
    assert samples[("stock_sync_order_deductions_settled_total", (("outcome", "failed"),))] == 1


class ProcessIdOfThisThread:
    """``os`` as operation_events sees it, with ``getpid()`` answering ``pid`` in the thread
    that made it only: the in-process worker's threads (and every other module) keep the real
    process id, which is what they key their engines and services by."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._thread = threading.get_ident()

    def getpid(self) -> int:
        return self._pid if threading.get_ident() == self._thread else os.getpid()

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_each_process_raises_its_own_counter_rows_and_readers_sum_them(
    any_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    completed = ("status_changed", "completed", None)
    for pid in (4000, 4001, 4001 + COUNTER_SHARDS):  # two shards, one of them twice
        monkeypatch.setattr(operation_events, "os", ProcessIdOfThisThread(pid))
        record_events(any_database, completed)

    with any_database.transaction() as session:
        rows = session.execute(
            select(MetricCounter.shard, MetricCounter.value).where(
                MetricCounter.name == "operations_finished"
            )
        ).all()
        summed = counter_values(session)
    # separate rows: finishing transactions on different processes never wait on one row
    assert sorted(rows) == [(4000 % COUNTER_SHARDS, 1), (4001 % COUNTER_SHARDS, 2)]
    assert summed["operations_finished"] == {"completed": 3}


def test_events_of_a_rolled_back_transaction_count_nothing(clean_database: Database) -> None:
    now = datetime.now(UTC)
    operation_id = uuid.UUID(add_operation(clean_database, "pending", created=now, updated=now))
    with pytest.raises(RuntimeError), clean_database.transaction() as session:
        SqlEventStore(session).record(
            operation_id=operation_id,
            action=LogAction.OPERATION_FAILED.value,
            from_status="pending",
            to_status="failed",
            error_type="InsufficientStock",
            details={},
        )
        raise RuntimeError("the change fails")

    with clean_database.transaction() as session:
        assert counter_values(session) == {}


def test_each_maintenance_tasks_last_success_and_beats_last_send_are_exported(
    clean_database: Database,
) -> None:
    with recorded_run(clean_database, SWEEP):
        pass
    with clean_database.transaction() as session:
        swept = last_runs(session)[SWEEP].finished_at
    with pytest.raises(RuntimeError), recorded_run(clean_database, SWEEP):
        raise RuntimeError("the next sweep failed")
    with recorded_run(clean_database, "a_task_added_later"):
        pass
    sent = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    record_beat_send(clean_database, "sweep-stuck-operations", "stock_sync.sweep", sent)
    with pytest.raises(RuntimeError), recorded_run(clean_database, RECONCILE):
        raise RuntimeError("never succeeded")

    snapshot = read_metrics(clean_database, SETTINGS, now=datetime.now(UTC))

    samples = parse_exposition(render_prometheus(snapshot))
    exported = {
        dict(labels)["task"]: value
        for (name, labels), value in samples.items()
        if name == "stock_sync_maintenance_last_success_timestamp_seconds"
    }
    # the failed sweep kept the time of the one before; reconcile never succeeded: absent
    assert set(exported) == {SWEEP, "a_task_added_later", "beat"}
    assert exported[SWEEP] == pytest.approx(swept.timestamp())
    assert exported["beat"] == sent.timestamp()


def test_the_metrics_server_exports_the_microservices_reachability_probed_once_per_cache(
    known: KnownOperations, fake_microservice: Any
) -> None:
    probes: list[bool] = []

    def probe(url: str) -> Callable[[], bool]:
        def ask() -> bool:
            probes.append(True)
            return microservice_up(SETTINGS.model_copy(update={"microservice_url": url}))

        return CachedProbe(ask, max_age_s=3600).get

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    down_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    for url, expected in ((fake_microservice.url, 1), (down_url, 0)):
        probes.clear()
        server = make_metrics_server(
            known.database, SETTINGS, "127.0.0.1", 0, microservice_probe=probe(url)
        )
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            base = f"http://127.0.0.1:{server.server_port}"
            bodies = [get(f"{base}/metrics")[2] for _ in range(3)]
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
        for body in bodies:
            assert parse_exposition(body)[("stock_sync_microservice_up", ())] == expected
        assert len(probes) == 1  # three scrapes, one probe


def test_the_known_error_types_are_the_domain_errors() -> None:
    assert {"StockSyncError", "InsufficientStock", "MicroserviceUnavailable"} <= set(
        KNOWN_ERROR_TYPES
    )


def test_the_queue_length_is_left_out_when_unknown() -> None:
    text = render_prometheus(MetricsSnapshot(generated_at=datetime.now(UTC), window_s=60))

    families = {family.name for family in text_string_to_metric_families(text)}
    assert "stock_sync_queue_length" not in families
    assert parse_exposition(text)[("stock_sync_operations", (("status", "stock_deducted"),))] == 0


# --- the metrics server -------------------------------------------------------------------------


@pytest.fixture
def serve_metrics(known: KnownOperations) -> Iterator[tuple[str, list[int]]]:
    """The metrics server on a free port over the known set; yields its URL and a list that
    grows by one each time the metrics are computed (the broker is asked once per computation)."""
    computations: list[int] = []

    def fake_queue_length() -> int:
        computations.append(1)
        return 3

    server = make_metrics_server(known.database, SETTINGS, "127.0.0.1", 0, fake_queue_length)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", computations
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_the_live_metrics_pass_promtool_check_metrics(
    known: KnownOperations, serve_metrics: tuple[str, list[int]]
) -> None:
    url, _ = serve_metrics
    record_events(known.database, (LogAction.OPERATION_CREATED.value, "pending", "InvalidInput"))
    record_transitions(
        known.database,
        (ORDER_DEDUCTION, "completed", {"processing_s": 12.5}),
        (ORDER_DEDUCTION, "failed", {}),
    )

    status, _, body = get(f"{url}/metrics")

    assert status == 200 and "stock_sync_processing_seconds_bucket" in body
    checked = check_metrics(body)
    # promtool prints one line per problem (exit 3 for lint problems); none is allowed
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")


def test_the_server_answers_metrics_that_parse(serve_metrics: tuple[str, list[int]]) -> None:
    url, _ = serve_metrics

    status, content_type, body = get(f"{url}/metrics")

    assert status == 200
    assert content_type.startswith("text/plain; version=")
    assert_known_exposition(body)
    samples = parse_exposition(body)
    assert samples[("stock_sync_queue_length", (("queue", SETTINGS.queue_name),))] == 3
    assert samples[("stock_sync_broker_up", ())] == 1
    # prometheus_client's own collectors share the registry
    assert ("process_cpu_seconds_total", ()) in samples
    assert any(name == "python_info" for name, _ in samples)
    assert any(name == "python_gc_objects_collected_total" for name, _ in samples)


def request(url: str, method: str = "GET", **headers: str) -> tuple[int, dict[str, str], bytes]:
    call = urllib.request.Request(url, method=method, headers=headers)
    with urllib.request.urlopen(call, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def test_the_server_negotiates_openmetrics_gzip_and_head(
    serve_metrics: tuple[str, list[int]],
) -> None:
    url, _ = serve_metrics

    _, headers, body = request(f"{url}/metrics", Accept="application/openmetrics-text")
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    _, headers, body = request(f"{url}/metrics", **{"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert b"stock_sync_stuck_operations 3" in gzip.decompress(body)
    status, _, body = request(f"{url}/metrics", method="HEAD")
    assert status == 200 and body == b""


def test_a_down_broker_is_reported_and_its_queue_left_out(
    known: KnownOperations, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_metrics_server(known.database, SETTINGS, "127.0.0.1", 0, lambda: None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with caplog.at_level(logging.ERROR, logger="stock_sync.metrics_server"):
            status, _, body = get(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

    assert status == 200
    samples = parse_exposition(body)
    assert samples[("stock_sync_broker_up", ())] == 0
    assert not any(name == "stock_sync_queue_length" for name, _ in samples)
    assert samples[("stock_sync_stuck_operations", ())] == STUCK
    assert any("broker does not answer" in record.getMessage() for record in caplog.records)


def test_a_down_database_still_answers_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-pw"
    database = Database(f"postgresql+psycopg2://stock:{secret}@127.0.0.1:1/nothing")
    server = make_metrics_server(database, SETTINGS, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with caplog.at_level(logging.ERROR, logger="stock_sync.metrics_server"):
            status, _, body = get(f"http://127.0.0.1:{server.server_port}/metrics")
            health = get(f"http://127.0.0.1:{server.server_port}/healthz")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        database.dispose()

    assert status == 200 and health[::2] == (200, "ok\n")
    samples = parse_exposition(body)
    assert samples[("stock_sync_database_up", ())] == 0
    assert ("process_cpu_seconds_total", ()) in samples
    assert not any(name == "stock_sync_stuck_operations" for name, _ in samples)
    errors = [record.getMessage() for record in caplog.records]
    assert any("database unavailable" in message for message in errors), errors
    assert not any(secret in message for message in errors)


def test_the_server_answers_healthz_and_refuses_other_paths(
    serve_metrics: tuple[str, list[int]],
) -> None:
    url, _ = serve_metrics

    assert get(f"{url}/healthz")[::2] == (200, "ok\n")
    assert get(f"{url}/nothing-here")[0] == 404


def test_scrapes_within_the_cache_time_share_one_computation(
    serve_metrics: tuple[str, list[int]],
) -> None:
    url, computations = serve_metrics

    first, second = get(f"{url}/metrics")[2], get(f"{url}/metrics")[2]

    def own(text: str) -> list[str]:  # the process metrics move between scrapes; ours do not
        return [line for line in text.splitlines() if line.startswith("stock_sync_")]

    assert own(first) == own(second) and own(first)
    assert len(computations) == 1


@pytest.fixture
def idle_server() -> Iterator[tuple[str, int]]:
    """A metrics server that closes a connection idle for 0.3 s (its snapshots never change)."""
    cache = MetricsCache(lambda: MetricsSnapshot(generated_at=datetime.now(UTC), window_s=60), 5)
    app = metrics_server_app(metrics_registry(cache))
    server = MetricsServer(("127.0.0.1", 0), app, idle_timeout_s=0.3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_within(connection: socket.socket, seconds: float) -> bool:
    """True when the server closes ``connection`` (EOF) before ``seconds`` have passed."""
    connection.settimeout(seconds)
    try:
        while connection.recv(4096):
            pass  # the rest of an answer
    except TimeoutError:
        return False
    return True


def test_an_idle_connection_is_closed(idle_server: tuple[str, int]) -> None:
    with socket.create_connection(idle_server) as silent:
        assert closed_within(silent, 5)


def test_a_keep_alive_connection_is_closed_once_idle(idle_server: tuple[str, int]) -> None:
    with socket.create_connection(idle_server) as keep_alive:
        keep_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: metrics\r\n\r\n")
        assert keep_alive.recv(4096).startswith(b"HTTP/1.0 200 OK")
        assert closed_within(keep_alive, 5)


def test_the_idle_timeout_is_thirty_seconds_by_default(known: KnownOperations) -> None:
    server = make_metrics_server(known.database, SETTINGS, "127.0.0.1", 0)
    try:
        assert server.idle_timeout_s == IDLE_TIMEOUT_S == 30
    finally:
        server.server_close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counting_cache(max_age_s: float) -> tuple[MetricsCache, FakeClock, list[int]]:
    clock, computations = FakeClock(), []

    def compute() -> MetricsSnapshot:
        computations.append(1)
        return MetricsSnapshot(generated_at=datetime.now(UTC), window_s=len(computations))

    return MetricsCache(compute, max_age_s, clock), clock, computations


def test_the_cache_reuses_a_computation_until_it_is_too_old() -> None:
    cache, clock, computations = counting_cache(max_age_s=5)

    first = cache.get()
    clock.now += 4.9
    assert cache.get() is first and len(computations) == 1
    clock.now += 0.1
    assert cache.get() is not first and len(computations) == 2


def test_concurrent_callers_share_one_computation() -> None:
    cache, _, computations = counting_cache(max_age_s=5)
    threads = [threading.Thread(target=cache.get) for _ in range(8)]

    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(computations) == 1


def test_a_zero_cache_time_computes_every_time() -> None:
    cache, _, computations = counting_cache(max_age_s=0)

    cache.get()
    cache.get()

    assert len(computations) == 2


# --- the broker's queue length ------------------------------------------------------------------


def test_the_queue_length_counts_waiting_messages_on_redis() -> None:
    app = Celery("queue-length-test", broker=REDIS_URL)
    queue_name = f"stock-sync-metrics-test-{uuid.uuid4().hex[:8]}"
    assert queue_length(app, queue_name) == 0  # Redis holds no key for an empty queue
    with app.connection_for_write() as connection:
        producer = connection.Producer()
        for number in range(3):
            producer.publish({"n": number}, routing_key=queue_name)  # the default exchange
        try:
            assert queue_length(app, queue_name) == 3
        finally:
            connection.default_channel.queue_purge(queue_name)


def test_an_unreachable_broker_gives_no_queue_length() -> None:
    app = Celery("queue-length-test", broker="redis://127.0.0.1:1/0")

    assert queue_length(app, "anything") is None


# --- stock-sync stats ---------------------------------------------------------------------------


def run_stats(postgres_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "STOCK_SYNC_DATABASE_URL": postgres_url,
        "STOCK_SYNC_BROKER_URL": REDIS_URL,
        "STOCK_SYNC_QUEUE_NAME": run_queue_name("stats"),
        "STOCK_SYNC_ALERT_WINDOW_S": str(WINDOW_S),
        "STOCK_SYNC_STUCK_AFTER_S": str(STUCK_AFTER_S),
    }
    return subprocess.run(
        [CLI, "stats", *args], capture_output=True, text=True, env=environment, timeout=60
    )


def test_stats_json_prints_the_figures(known: KnownOperations, postgres_url: str) -> None:
    result = run_stats(postgres_url, "--json")

    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert_known_figures(figures)
    assert figures["stuck"]["sample_operation_ids"] == known.stuck_oldest_first
    assert figures["queue"]["length"] == 0


def table_rows(output: str) -> dict[str, str]:
    """The metric/value rows of the human table: after the dashes, up to the sample lines."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    rows = [re.split(r"\s{2,}", line) for line in lines[start:] if re.search(r"\s{2,}", line)]
    return {metric: value for metric, value in rows}


def test_stats_prints_a_table_for_people(known: KnownOperations, postgres_url: str) -> None:
    result = run_stats(postgres_url)

    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    for status, count in LIVE.items():
        assert rows[f"operations {status}"] == str(count)
    for status, count in FINISHED.items():
        assert rows[f"finished {status}"] == str(count)
    assert rows["created"] == str(CREATED)
    assert float(rows["processing seconds avg"]) == pytest.approx(PROCESSING_AVG_S)
    assert float(rows["processing seconds p95"]) == pytest.approx(PROCESSING_P95_S)
    assert float(rows["error ratio"]) == pytest.approx(ERROR_RATIO)
    assert rows["cancellations"] == str(CANCELLATIONS)
    assert float(rows["cancellation ratio"]) == pytest.approx(CANCELLATION_RATIO)
    assert rows["stuck operations"] == str(STUCK)
    assert rows["errors MicroserviceUnavailable"] == "2"
    assert f"stuck: {', '.join(known.stuck_oldest_first)}" in result.stdout

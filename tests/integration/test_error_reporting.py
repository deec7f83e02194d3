"""Sentry error reporting (stock_sync/adapters/error_reporting.py) against a receiver this test
runs on 127.0.0.1: the DSN points at it, and it records every envelope sentry-sdk sends.

A failed operation is one event tagged with its operation and stage; a retried operation that
completes is none; passwords in URLs never leave; beat's schedule becomes cron check-ins.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import sentry_sdk
from celery import Celery
from celery.beat import Scheduler

from stock_sync.adapters import error_reporting
from stock_sync.adapters.db import Database
from stock_sync.adapters.error_reporting import FailedOperation, SentryErrorReporter
from stock_sync.adapters.settings import get_settings
from stock_sync.adapters.stock_ledger import set_stock
from stock_sync.composition import reset_services
from stock_sync_fake import FakeMicroservice
from tests import celery_processes
from tests.support import Pipeline, order, receiving_posts

CLI = str(Path(sys.executable).with_name("stock-sync"))
WAIT_S = 60.0
PASSWORD = "hunter2-S3CRET"


@dataclass
class Envelope:
    headers: dict[str, Any]
    items: list[tuple[dict[str, Any], Any]]
    raw: bytes


@dataclass
class SentryReceiver:
    """Sentry's envelope endpoint for the project of :attr:`dsn`."""

    dsn: str
    envelopes: list[Envelope] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def items(self, kind: str) -> list[Any]:
        return [
            payload
            for envelope in list(self.envelopes)
            for header, payload in envelope.items
            if header.get("type") == kind
        ]

    def events(self) -> list[dict[str, Any]]:
        return self.items("event")

    def wait_for(self, kind: str, count: int) -> list[Any]:
        deadline = time.monotonic() + WAIT_S
        while len(found := self.items(kind)) < count:
            assert time.monotonic() < deadline, (kind, self.kinds())
            time.sleep(0.05)
        return found

    def kinds(self) -> list[str]:
        return [header.get("type", "?") for e in self.envelopes for header, _ in e.items]


def parse_envelope(raw: bytes) -> Envelope:
    """Sentry's envelope format: a header line, then per item a header line and a payload
    (``length`` bytes when the item header gives it, else up to the next newline)."""
    header_line, _, rest = raw.partition(b"\n")
    items = []
    while rest.strip():
        item_line, _, rest = rest.partition(b"\n")
        item = json.loads(item_line)
        if "length" in item:
            payload, rest = rest[: item["length"]], rest[item["length"] + 1 :]
        else:
            payload, _, rest = rest.partition(b"\n")
        items.append((item, json.loads(payload) if payload.strip() else None))
    return Envelope(json.loads(header_line), items, raw)


def sentry_variables(receiver: SentryReceiver) -> dict[str, str]:
    """What points sentry-sdk in a process at ``receiver``."""
    return {"SENTRY_DSN": receiver.dsn, "SENTRY_ENVIRONMENT": "test"}


@contextmanager
def sentry_receiver() -> Iterator[SentryReceiver]:
    receiver: SentryReceiver

    def record(path: str, headers: Message, body: bytes) -> int:
        receiver.paths.append(path)
        receiver.envelopes.append(parse_envelope(body))
        return 200

    with receiving_posts(record) as port:
        receiver = SentryReceiver(dsn=f"http://publickey@127.0.0.1:{port}/42")
        yield receiver


# --- a real prefork worker reporting to the receiver ----------------------------------------------


@dataclass
class ReportingWorker:
    """A real worker reporting to :attr:`receiver`, and the services its operations use."""

    receiver: SentryReceiver
    environment: dict[str, str]
    process: celery_processes.CeleryProcess
    database: Database
    fake: FakeMicroservice

    def run_order(
        self, an_order: dict[str, Any], stock: dict[str, int], until: str, **fake_options: Any
    ) -> uuid.UUID:
        """Set ``stock``, give the fake ``an_order``, submit it with `stock-sync submit` and
        wait until its operation is in the status ``until``."""
        with self.database.transaction() as session:
            for sku, quantity in stock.items():
                set_stock(session, sku, quantity)
        self.fake.add_order(an_order, **fake_options)
        result = subprocess.run(
            [CLI, "submit", an_order["id"]],
            capture_output=True,
            text=True,
            env=self.environment,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        operation_id = uuid.UUID(result.stdout.strip())
        wait_for_status(self.database, operation_id, until)
        return operation_id


@pytest.fixture
def reporting_worker(
    clean_database: Database,
    postgres_url: str,
    fake_microservice: FakeMicroservice,
    tmp_path: Path,
) -> Iterator[ReportingWorker]:
    """`celery worker` (prefork, Sentry initialised by celeryd_init before the fork) with
    SENTRY_DSN at the receiver."""
    fake_microservice.reset()
    with sentry_receiver() as receiver, celery_processes.stopped_at_exit() as started:
        env = celery_processes.process_environment(
            postgres_url, fake_microservice, tmp_path, "sentry", **sentry_variables(receiver)
        )
        worker = celery_processes.worker(
            env, tmp_path / "worker.log", "--pool", "prefork", concurrency=1
        )
        started.append(worker)
        yield ReportingWorker(receiver, env, worker, clean_database, fake_microservice)


def wait_for_status(database: Database, operation_id: uuid.UUID, status: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        with database.transaction() as session:
            from stock_sync.adapters.models import PendingStockOperation

            row = session.get(PendingStockOperation, operation_id)
            found = row.status if row else None
        if found == status:
            return
        assert time.monotonic() < deadline, (operation_id, found)
        time.sleep(0.05)


@pytest.mark.slow
def test_a_failed_operation_is_one_event_tagged_with_its_operation_and_stage(
    reporting_worker: ReportingWorker,
) -> None:
    """Validation fails four times (three retries: not reported), then FAILED: one event."""
    operation_id = reporting_worker.run_order(
        order("sentry-fail", ("SKU-E", 3)), {"SKU-E": 1}, until="failed"
    )
    receiver = reporting_worker.receiver
    receiver.wait_for("event", 1)
    reporting_worker.process.stop()  # a warm shutdown: the child flushes what sentry-sdk holds

    (event,) = receiver.events()
    (envelope,) = [e for e in receiver.envelopes if any(h["type"] == "event" for h, _ in e.items)]
    print(envelope.raw.decode())  # the envelope as sent, with pytest -s
    tags = event["tags"]
    assert tags["operation_id"] == str(operation_id)
    assert tags["stage"] == "validate_stock"
    assert tags["error_type"] == "InsufficientStock"
    assert tags["stock_sync.process"] == "worker"
    assert event["level"] == "error"
    assert event["message"].startswith("operation failed in validate_stock: InsufficientStock")
    assert event["fingerprint"] == [
        "stock-sync-operation-failed",
        "validate_stock",
        "InsufficientStock",
    ]
    assert event["contexts"]["operation"]["order_id"] == "sentry-fail"
    assert event["environment"] == "test"
    assert set(receiver.paths) == {"/api/42/envelope/"}


@pytest.mark.slow
def test_an_operation_retried_then_completed_reports_nothing(
    reporting_worker: ReportingWorker,
) -> None:
    reporting_worker.run_order(
        order("sentry-late", ("SKU-R", 1)), {"SKU-R": 5}, until="completed", ready_after_reads=2
    )
    worker = reporting_worker.process
    worker.stop()
    assert "retry_scheduled" in worker.log()  # Celery's Retry was raised twice
    assert reporting_worker.receiver.events() == []


# --- in this process: scrubbing, crons -----------------------------------------------------------


@pytest.fixture
def sentry_here(monkeypatch: pytest.MonkeyPatch) -> Iterator[SentryReceiver]:
    """Sentry initialised in this process (as the CLI or a producer would be), at a receiver."""
    with sentry_receiver() as receiver:
        monkeypatch.setenv("SENTRY_DSN", receiver.dsn)
        assert error_reporting.start_error_reporting("test")
        try:
            yield receiver
        finally:
            error_reporting.stop_error_reporting()


def test_a_password_in_a_url_never_leaves_the_process(sentry_here: SentryReceiver) -> None:
    logging.getLogger("stock_sync.test").warning(
        "reconnecting to postgresql://stock:%s@db:5432/stock", PASSWORD
    )  # a breadcrumb of the events below
    SentryErrorReporter().operation_failed(
        FailedOperation(
            operation_id=uuid.uuid4(),
            order_id="order-9",
            stage="sync_microservice",
            error_type="MicroserviceUnavailable",
            error=f"cannot reach http://svc:{PASSWORD}@allegro.internal/orders",
            reason="retry limit of sync_microservice reached",
        )
    )
    try:
        raise RuntimeError(f"broker amqp://guest:{PASSWORD}@rabbit:5672// refused")
    except RuntimeError as error:
        sentry_sdk.capture_exception(error)
    sentry_sdk.flush(timeout=10)

    first, second = sentry_here.wait_for("event", 2)
    raw = b"".join(envelope.raw for envelope in sentry_here.envelopes)
    assert PASSWORD.encode() not in raw
    assert first["message"].endswith("cannot reach http://svc:***@allegro.internal/orders")
    assert (
        first["contexts"]["operation"]["error"]
        == "cannot reach http://svc:***@allegro.internal/orders"
    )
    crumbs = [crumb["message"] for crumb in first["breadcrumbs"]["values"]]
    assert "reconnecting to postgresql://stock:***@db:5432/stock" in crumbs
    (exception,) = second["exception"]["values"]
    assert exception["value"] == "broker amqp://guest:***@rabbit:5672// refused"


def test_without_a_dsn_nothing_starts_and_the_services_report_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SENTRY_DSN", raising=False)
    assert error_reporting.start_error_reporting("test") is False
    assert not sentry_sdk.get_client().is_active()
    assert isinstance(error_reporting.process_error_reporter(), error_reporting.NoErrorReporter)


@pytest.fixture
def sentry_crons(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("STOCK_SYNC_SENTRY_CRONS", "1")
    get_settings.cache_clear()
    try:
        yield
    finally:
        monkeypatch.delenv("STOCK_SYNC_SENTRY_CRONS")
        get_settings.cache_clear()
        reset_services()


def test_beats_schedule_is_checked_in_as_cron_monitors_when_enabled(
    pipeline: Pipeline, sentry_crons: None, sentry_here: SentryReceiver, celery_session_app: Celery
) -> None:
    """Beat's own apply_entry (as beat runs a due entry) checks the run in; the worker that
    ran the task checks it out."""
    scheduler = Scheduler(app=celery_session_app)  # the in-memory scheduler: no schedule file
    entry = scheduler.schedule["sweep-stuck-operations"]
    scheduler.apply_entry(entry, producer=scheduler.producer)
    in_progress, done = sentry_here.wait_for("check_in", 2)
    print(json.dumps([in_progress, done], indent=2))
    assert in_progress["monitor_slug"] == done["monitor_slug"] == "sweep-stuck-operations"
    assert (in_progress["status"], done["status"]) == ("in_progress", "ok")
    assert in_progress["check_in_id"] == done["check_in_id"]
    assert in_progress["monitor_config"]["schedule"] == {
        "type": "interval",
        "value": 1,
        "unit": "minute",
    }


WITHOUT_THE_EXTRA = """
import logging, sys
sys.modules["sentry_sdk"] = None  # as if stock-sync[sentry] were not installed
logging.basicConfig(format="%(levelname)s %(message)s")
from stock_sync.adapters import error_reporting
reporters = [error_reporting.process_error_reporter() for _ in range(2)]
print(*(type(reporter).__name__ for reporter in reporters))
"""


def test_without_the_extra_a_dsn_is_one_warning_and_nothing_is_reported(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "SENTRY_DSN": "http://key@127.0.0.1:9/1",
        "STOCK_SYNC_DATA_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_THE_EXTRA], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["NoErrorReporter", "NoErrorReporter"]
    assert result.stderr.splitlines() == [
        "WARNING SENTRY_DSN is set but sentry-sdk is not installed "
        "(pip install 'stock-sync[sentry]'): errors are not reported"
    ]

"""What every JSON log record carries (ISO 8601 UTC milliseconds, host, pid), which level a
Celery process logs at (an explicit --loglevel wins over STOCK_SYNC_LOG_LEVEL), and that the CLI
and long-running commands log their own records as JSON too."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import pytest

from stock_sync.adapters.db import Database
from stock_sync.adapters.logging_setup import (
    configure_cli_logging,
    configure_server_logging,
    json_formatter,
    json_handler,
    worker_log_level,
)
from stock_sync_dev.processes import celery_command, worker_arguments
from tests.conftest import REDIS_URL, run_queue_name
from tests.support import bare_root_logger, insert_operation

BIN = Path(sys.executable).parent
ISO_UTC_MILLISECONDS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def a_record(**extra: Any) -> logging.LogRecord:
    record = logging.LogRecord(
        "stock_sync.test", logging.INFO, __file__, 1, "hello %s", ("x",), None
    )
    record.__dict__.update(extra)
    return record


def test_a_record_carries_an_iso_utc_timestamp_with_milliseconds_the_host_and_the_pid() -> None:
    record = a_record(operation_id="op-1", context={"n": 1})

    fields = json.loads(json_formatter().format(record))

    assert ISO_UTC_MILLISECONDS.fullmatch(fields["timestamp"]), fields["timestamp"]
    stamped = datetime.fromisoformat(fields["timestamp"].replace("Z", "+00:00"))
    created = datetime.fromtimestamp(record.created, UTC)
    assert abs((stamped - created).total_seconds()) < 0.001
    assert fields["host"] == socket.gethostname()
    assert fields["pid"] == os.getpid()
    # the fields that were there before stay
    assert (fields["level"], fields["logger"], fields["message"]) == (
        "INFO",
        "stock_sync.test",
        "hello x",
    )
    assert (fields["operation_id"], fields["context"]) == ("op-1", {"n": 1})


def test_the_timestamp_is_utc_whatever_the_local_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Europe/Warsaw")
    time.tzset()
    record = a_record()
    record.created = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC).timestamp() + 0.007
    record.msecs = 7.0  # as logging computes it from `created`

    try:
        fields = json.loads(json_formatter().format(record))
    finally:
        monkeypatch.undo()
        time.tzset()

    assert fields["timestamp"] == "2026-11-26T12:00:00.007Z"  # zero-padded milliseconds


# --- which level a Celery process logs at ------------------------------------------------------


def level_inside_a_celery_like_command(args: list[str], configured: str) -> int | str:
    """Runs a click command shaped like `celery worker` (--loglevel defaults to WARNING and is
    converted to a number) and resolves the level inside it, as the setup_logging signal does."""
    seen: list[int | str] = []

    @click.command()
    @click.option("-l", "--loglevel", default="WARNING")
    def worker(loglevel: str) -> None:
        seen.append(worker_log_level(logging.getLevelName(loglevel.upper()), configured))

    worker.main(args, standalone_mode=False)
    return seen[0]


@pytest.mark.parametrize(
    ("args", "configured", "expected"),
    [
        (["--loglevel", "DEBUG"], "WARNING", logging.DEBUG),
        (["-l", "error"], "DEBUG", logging.ERROR),
        # an explicit WARNING is honoured although it equals Celery's default
        (["--loglevel=WARNING"], "DEBUG", logging.WARNING),
        ([], "DEBUG", "DEBUG"),  # nothing given: STOCK_SYNC_LOG_LEVEL
        ([], "INFO", "INFO"),
    ],
)
def test_an_explicit_loglevel_wins_over_the_setting(
    args: list[str], configured: str, expected: int | str
) -> None:
    assert level_inside_a_celery_like_command(args, configured) == expected


def test_without_a_celery_command_line_the_setting_applies() -> None:
    # an embedded worker (the tests' in-process one) passes a level but has no command line
    assert worker_log_level(logging.ERROR, "INFO") == "INFO"

    @click.command()
    def other() -> None:  # a stock-sync command starting a worker in-process
        assert worker_log_level(logging.ERROR, "INFO") == "INFO"

    other.main([], standalone_mode=False)


# --- the CLI and long-running commands ---------------------------------------------------------


def test_a_server_command_replaces_the_cli_handler_with_one_at_its_level() -> None:
    cli_stream, server_stream = io.StringIO(), io.StringIO()
    with bare_root_logger() as root:
        configure_cli_logging(cli_stream)

        installed = configure_server_logging("INFO", server_stream)

        assert root.handlers == [installed]
        logger = logging.getLogger("stock_sync.metrics_server")
        logger.info("serving")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.error("metrics unavailable", exc_info=True)
    assert cli_stream.getvalue() == ""
    info, error = (json.loads(line) for line in server_stream.getvalue().splitlines())
    assert (info["level"], info["message"], info["pid"]) == ("INFO", "serving", os.getpid())
    assert "Traceback" in error["exc_info"]  # a service keeps its tracebacks, as the worker does


def test_a_server_command_leaves_out_alembics_per_probe_info_lines() -> None:
    alembic = logging.getLogger("alembic.runtime.migration")
    saved = alembic.level
    try:
        with bare_root_logger():
            configure_server_logging("DEBUG", io.StringIO())
            assert not alembic.isEnabledFor(logging.INFO)  # each /readyz would log two
            assert alembic.isEnabledFor(logging.WARNING)
    finally:
        alembic.setLevel(saved)


def test_a_server_command_leaves_a_root_logger_configured_by_someone_else() -> None:
    with bare_root_logger() as root:
        foreign = logging.StreamHandler(io.StringIO())
        root.addHandler(foreign)
        root.addHandler(json_handler(io.StringIO()))

        assert configure_server_logging("DEBUG") is None
        assert foreign in root.handlers and len(root.handlers) == 2


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON records of a process's stderr (Celery prints a few plain lines of its own
    before logging is set up, such as its warning about running as root)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def assert_record_shape(record: dict[str, Any]) -> None:
    assert ISO_UTC_MILLISECONDS.fullmatch(record["timestamp"]), record
    assert record["host"] == socket.gethostname(), record
    assert isinstance(record["pid"], int), record


def test_the_cli_logs_a_services_warnings_and_errors_as_json_lines(
    clean_database: Database,
) -> None:
    """`stock-sync sweep` with the broker down: the sweep's own records reach stderr as JSON,
    the broker's password masked; the command's result still goes to stdout."""
    env = {**os.environ, "STOCK_SYNC_BROKER_URL": "redis://:BROKER-S3CRET@127.0.0.1:1/0"}
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    dead = insert_operation(  # its attempt started an hour ago and never ended
        clean_database, dispatched_at=long_ago, attempt_started_at=long_ago
    )
    swept = subprocess.run(
        [str(BIN / "stock-sync"), "sweep", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )

    assert swept.returncode == 0, swept.stderr
    report = json.loads(swept.stdout)
    assert report["not_enqueued"] == [str(dead)] and report["probe_sent"] is False
    records = [json.loads(line) for line in swept.stderr.splitlines()]  # every line is JSON
    assert records, "the sweep logged nothing"
    for record in records:
        assert_record_shape(record)
        assert record["level"] in {"WARNING", "ERROR", "CRITICAL"}, record
    assert any("could not enqueue" in record["message"] for record in records), records
    assert any("queue probe" in record["message"] for record in records), records
    assert "BROKER-S3CRET" not in swept.stderr + swept.stdout
    assert "Traceback" not in swept.stderr


def test_the_metrics_server_logs_its_own_records_as_json(tmp_path: Path) -> None:
    """`stock-sync metrics-server` with its database down and STOCK_SYNC_LOG_LEVEL=DEBUG: a
    scrape still answers; the failure and the request line (DEBUG, below the CLI's WARNING)
    reach stderr as JSON records, the password masked."""
    with socket.socket() as probe:  # a port nothing listens on: the database is "down"
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    env = {
        **os.environ,
        "STOCK_SYNC_DATABASE_URL": f"postgresql://u:DB-S3CRET@127.0.0.1:{closed}/x",
        "STOCK_SYNC_BROKER_URL": REDIS_URL,
        "STOCK_SYNC_DATA_DIR": str(tmp_path),
        "STOCK_SYNC_LOG_LEVEL": "DEBUG",
    }
    server = subprocess.Popen(
        [str(BIN / "stock-sync"), "metrics-server", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert server.stdout is not None and server.stderr is not None
    with reading_stderr(server, "GET /metrics") as (stderr_lines, request_logged):
        banner = server.stdout.readline()  # "serving metrics on http://127.0.0.1:PORT/metrics"
        url = banner.split(" on ", 1)[1].strip()
        with urllib.request.urlopen(url, timeout=30) as answer:
            body = answer.read().decode()
        # wsgiref logs the request line after the answer went out: wait for it, or a stop
        # right after the answer loses it.
        assert request_logged.wait(30), "".join(stderr_lines)
    stderr = "".join(stderr_lines)

    assert "stock_sync_database_up 0.0" in body
    records = json_lines(stderr)
    failures = [record for record in records if record["logger"] == "stock_sync.metrics_server"]
    assert failures, stderr
    for record in failures:
        assert_record_shape(record)
    assert {record["level"] for record in failures} == {"DEBUG", "ERROR"}, failures
    assert "DB-S3CRET" not in stderr + body


@contextmanager
def reading_stderr(
    process: subprocess.Popen[str], marker: str
) -> Iterator[tuple[list[str], threading.Event]]:
    """The lines ``process`` writes to stderr, as they come, and an event set once one contains
    ``marker``; on the way out the process is terminated and its pipes closed."""
    lines: list[str] = []
    seen = threading.Event()

    def read_stderr() -> None:
        # Blocking reads in a thread: select() on the pipe cannot see lines already pulled
        # into the text stream's buffer, so a poll could miss ``marker`` until its deadline.
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if marker in line:
                seen.set()

    reader = threading.Thread(target=read_stderr)
    reader.start()
    try:
        yield lines, seen
    finally:
        process.terminate()
        process.wait(timeout=30)
        reader.join(30)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


# --- a real worker process ---------------------------------------------------------------------


def worker_records_until(
    args: list[str], env_overrides: dict[str, str], done: str, timeout_s: float = 60.0
) -> list[dict[str, Any]]:
    """Start `celery -A tasks worker ARGS` (solo pool, its own queue on the real Redis), read
    its stderr until a record's message contains ``done``, stop it; returns its JSON records."""
    env = {
        **os.environ,
        "STOCK_SYNC_BROKER_URL": REDIS_URL,
        "STOCK_SYNC_QUEUE_NAME": run_queue_name("logs"),
        **env_overrides,
    }
    command = celery_command(worker_arguments("solo", 1, *args, loglevel=None))
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
    )
    with reading_stderr(process, done) as (lines, seen):
        seen.wait(timeout_s)
    assert any(done in line for line in lines), "".join(lines)[-3000:]
    return json_lines("".join(lines))


@pytest.mark.slow
def test_a_worker_started_with_loglevel_debug_logs_debug_records_as_json(
    postgres_url: str,
) -> None:
    records = worker_records_until(
        ["--loglevel", "DEBUG"], {"STOCK_SYNC_LOG_LEVEL": "WARNING"}, "ready."
    )

    assert any(record["level"] == "DEBUG" for record in records)
    for record in records:
        assert_record_shape(record)


@pytest.mark.slow
def test_a_worker_without_loglevel_logs_at_the_configured_level(postgres_url: str) -> None:
    # Celery's own default would be WARNING, which hides the INFO "ready." record.
    records = worker_records_until([], {"STOCK_SYNC_LOG_LEVEL": "INFO"}, "ready.")

    assert {record["level"] for record in records} <= {"INFO", "WARNING", "ERROR", "CRITICAL"}
    assert any(record["message"].endswith("ready.") for record in records)

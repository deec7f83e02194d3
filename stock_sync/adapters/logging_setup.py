"""JSON log output (python-json-logger) for the worker, beat, the CLI, the metrics server and
the tests.

Every record is one JSON object on one line: ``timestamp`` (ISO 8601, UTC, milliseconds),
``level``, ``logger``, ``host``, ``pid``, ``message`` and every extra field, with passwords and
tokens masked (stock_sync.adapters.redaction).

Who sets it up, at which level:

- the worker and beat (``tasks/app.py``, Celery's ``setup_logging`` signal): an explicit
  ``--loglevel`` on the Celery command line wins, else ``STOCK_SYNC_LOG_LEVEL``
  (:func:`worker_log_level`);
- the ``stock-sync`` CLI (:func:`configure_cli_logging`): WARNING and above, without
  tracebacks, since a command's result goes to stdout and its failure to one ``error:`` line;
- a long-running command such as the metrics server (:func:`configure_server_logging`):
  ``STOCK_SYNC_LOG_LEVEL``, with tracebacks, like the worker.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO, Any

import click
from click.core import ParameterSource
from pythonjsonlogger.json import JsonFormatter

from stock_sync.adapters.redaction import redact_data

JSON_FORMAT = "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s"
RENAMED_FIELDS = {"asctime": "timestamp", "levelname": "level", "name": "logger", "process": "pid"}
CLI_LOG_LEVEL = logging.WARNING


class RedactingJsonFormatter(JsonFormatter):
    """JsonFormatter that masks passwords and tokens (stock_sync.adapters.redaction) in every field
    of the record: the message, the extras and the formatted exception alike.

    ``with_traceback=False`` shows an exception as its last line (``RuntimeError: ...``): the
    CLI promises an operator no traceback on the terminal.
    """

    def __init__(self, *args: Any, with_traceback: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.with_traceback = with_traceback

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """ISO 8601 in UTC with milliseconds (``2026-11-26T12:00:00.123Z``): a pipeline stage
        takes tens of milliseconds, and hosts in different time zones share one timeline."""
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{seconds}.{int(record.msecs):03d}Z"

    def formatException(self, ei: Any) -> str | list[str]:  # type: ignore[override]
        # python-json-logger's own override returns str | list[str] (exc_info_as_array)
        if self.with_traceback:
            return super().formatException(ei)
        return "".join(traceback.format_exception_only(ei[0], ei[1])).strip()

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {
            key: redact_data(value) for key, value in super().process_log_record(log_data).items()
        }


def json_formatter(*, with_traceback: bool = True) -> RedactingJsonFormatter:
    """One JSON object per line: timestamp, level, logger, host, pid, message and every extra
    field, with passwords and tokens masked."""
    return RedactingJsonFormatter(
        JSON_FORMAT,
        rename_fields=RENAMED_FIELDS,
        # Read once: a container or a VM keeps its name, and a syscall per record buys nothing.
        static_fields={"host": socket.gethostname()},
        with_traceback=with_traceback,
    )


class JsonLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler with our JSON formatter; its class tells our handlers from a test
    runner's or an embedding application's (see :func:`configure_server_logging`)."""


def json_handler(stream: IO[str] | None = None, *, with_traceback: bool = True) -> logging.Handler:
    handler = JsonLogHandler(stream or sys.stderr)
    handler.setFormatter(json_formatter(with_traceback=with_traceback))
    return handler


def configure_json_logging(
    level: str | int = "INFO", stream: IO[str] | None = None
) -> logging.Handler:
    """Replace the root handlers with one JSON handler; returns it so callers can add filters.

    For a process that owns its logging: the worker, beat, the demo.
    """
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    handler = json_handler(stream)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def configure_cli_logging(stream: IO[str] | None = None) -> None:
    """Warnings and errors logged during a command become JSON lines on stderr (redacted, the
    exception as its last line, no traceback), instead of Python's last-resort handler
    printing them raw with their tracebacks. A failure still ends with the command's own
    ``error: ...`` line.

    Left alone when the root logger has handlers already (a test runner capturing logs).
    """
    root = logging.getLogger()
    if root.handlers:
        return
    handler = json_handler(stream, with_traceback=False)
    handler.setLevel(CLI_LOG_LEVEL)
    root.addHandler(handler)


ALEMBIC_MIGRATION_LOGGER = "alembic.runtime.migration"


def configure_server_logging(
    level: str | int, stream: IO[str] | None = None
) -> logging.Handler | None:
    """A long-running command (the metrics server) logs like the worker: JSON lines on stderr
    at ``level`` (``STOCK_SYNC_LOG_LEVEL``), tracebacks included.

    Replaces the CLI's handler (:func:`configure_cli_logging`); a root logger configured by
    someone else (a test runner invoking the command in-process) is left alone: returns None.
    """
    # /readyz opens an alembic migration context on every probe: two INFO lines each time
    # ("Context impl", "Will assume transactional DDL") would drown the server's own records.
    logging.getLogger(ALEMBIC_MIGRATION_LOGGER).setLevel(logging.WARNING)
    root = logging.getLogger()
    if any(not isinstance(handler, JsonLogHandler) for handler in root.handlers):
        return None
    return configure_json_logging(level, stream)


def worker_log_level(signal_level: int | str | None, configured: str) -> int | str:
    """The level of a Celery process: ``--loglevel`` when the command line gave it, else
    ``STOCK_SYNC_LOG_LEVEL`` (``configured``).

    Celery's ``setup_logging`` signal passes its ``--loglevel``, but that option defaults to
    WARNING, so the level alone cannot tell ``--loglevel WARNING`` from nothing at all; the
    Celery command's click context can. Without one (an embedded test worker, a pool child
    started with spawn) the setting applies.
    """
    if signal_level is not None and loglevel_given_on_command_line():
        return signal_level
    return configured


def loglevel_given_on_command_line() -> bool:
    """Whether the running click command (``celery worker``/``beat``) got ``--loglevel`` from
    its command line or environment rather than from its default."""
    context = click.get_current_context(silent=True)
    if context is None or "loglevel" not in context.params:
        return False
    source = context.get_parameter_source("loglevel")
    return source not in (None, ParameterSource.DEFAULT)


_operation_context: ContextVar[dict[str, Any] | None] = ContextVar(
    "operation_context", default=None
)


@contextmanager
def operation_log_context(**fields: Any) -> Iterator[None]:
    """Every record logged inside the block (this thread or task) carries ``fields``."""
    token = _operation_context.set({**(_operation_context.get() or {}), **fields})
    try:
        yield
    finally:
        _operation_context.reset(token)


class TaskContextFilter(logging.Filter):
    """Handler-level filter: adds task_id/task_name of the running Celery task, and the bound
    operation context, to every record that does not carry them already."""

    def __init__(self, current_task: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self._current_task = current_task

    def filter(self, record: logging.LogRecord) -> bool:
        task = self._current_task() if self._current_task else None
        task_id = getattr(getattr(task, "request", None), "id", None)
        if task is not None and task_id:
            record.__dict__.setdefault("task_id", task_id)
            record.__dict__.setdefault("task_name", task.name)
        for key, value in (_operation_context.get() or {}).items():
            record.__dict__.setdefault(key, value)
        return True

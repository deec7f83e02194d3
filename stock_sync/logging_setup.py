"""JSON log output (python-json-logger) for the CLI, the worker and the tests."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO, Any

from pythonjsonlogger.json import JsonFormatter

from stock_sync.redaction import one_line, redact, redact_data

JSON_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class RedactingJsonFormatter(JsonFormatter):
    """JsonFormatter that masks passwords and tokens (stock_sync.redaction) in every field of
    the record: the message, the extras and the formatted exception alike."""

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {
            key: redact_data(value) for key, value in super().process_log_record(log_data).items()
        }


class OneLineFormatter(logging.Formatter):
    """``level: message`` on one line, redacted, without the traceback: what the CLI prints
    for a warning or an error a service logs while a command runs."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {one_line(redact(record.getMessage()))}"


def configure_cli_logging(stream: IO[str] | None = None) -> None:
    """Warnings and errors logged during a command become single redacted lines on stderr,
    instead of Python's last-resort handler printing them raw with their tracebacks.

    Left alone when the root logger has handlers already (a test runner capturing logs).
    """
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(OneLineFormatter())
    handler.setLevel(logging.WARNING)
    root.addHandler(handler)


def json_formatter() -> JsonFormatter:
    """One JSON object per line: timestamp, level, logger, message and every extra field, with
    passwords and tokens masked."""
    return RedactingJsonFormatter(
        JSON_FORMAT,
        rename_fields={"asctime": "timestamp", "levelname": "level", "name": "logger"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )


def json_handler(stream: IO[str] | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(json_formatter())
    return handler


def configure_json_logging(level: str = "INFO", stream: IO[str] | None = None) -> logging.Handler:
    """Replace the root handlers with one JSON handler; returns it so callers can add filters."""
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    handler = json_handler(stream)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


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

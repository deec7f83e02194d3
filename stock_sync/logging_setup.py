"""JSON log output (python-json-logger) for the CLI, the worker and the tests."""

from __future__ import annotations

import logging
import sys
from typing import IO

from pythonjsonlogger.json import JsonFormatter

JSON_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def json_formatter() -> JsonFormatter:
    """One JSON object per line: timestamp, level, logger, message and every extra field."""
    return JsonFormatter(
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

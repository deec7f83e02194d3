"""The documented bounds of every setting (README, Configuration), written out independently of
stock_sync/adapters/settings.py, and a way to run code under a chosen STOCK_SYNC_* environment."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from stock_sync.adapters.settings import Settings, get_settings
from stock_sync.composition import reset_services

DAY = 86_400
WEEK = 7 * DAY
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def seconds(at_most: float) -> Callable[[Any], bool]:
    return lambda value: math.isfinite(value) and 0 < value <= at_most


def whole(at_least: int, at_most: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, int) and at_least <= value <= at_most


def rate(value: float) -> bool:
    return math.isfinite(value) and 0 < value <= 1


def any_text(value: Any) -> bool:
    return isinstance(value, str)


def printable_word(value: Any) -> bool:
    return 1 <= len(value) <= 200 and not any(c.isspace() or not c.isprintable() for c in value)


def http_url_or_empty(value: str) -> bool:
    return value == "" or value.lower().startswith(("http://", "https://"))


DOCUMENTED_BOUNDS: dict[str, Callable[[Any], bool]] = {
    "STOCK_SYNC_DATABASE_URL": any_text,
    "STOCK_SYNC_BROKER_URL": any_text,
    "STOCK_SYNC_DATA_DIR": lambda value: True,
    "STOCK_SYNC_EMBEDDED": lambda value: isinstance(value, bool),
    "STOCK_SYNC_QUEUE_NAME": printable_word,
    "STOCK_SYNC_MAINTENANCE_QUEUE_NAME": lambda value: value == "" or printable_word(value),
    "STOCK_SYNC_MICROSERVICE_URL": lambda value: http_url_or_empty(value) and value != "",
    "STOCK_SYNC_MICROSERVICE_TIMEOUT_S": seconds(300),
    "STOCK_SYNC_MICROSERVICE_DEADLINE_S": seconds(3600),
    "STOCK_SYNC_MICROSERVICE_MAX_RESPONSE_BYTES": whole(1024, 64 * 2**20),
    "STOCK_SYNC_MAX_LINE_QUANTITY": whole(1, 2**31 - 1),
    "STOCK_SYNC_MAX_RETRIES_PENDING": whole(0, 1000),
    "STOCK_SYNC_MAX_RETRIES_PROCESSING": whole(0, 1000),
    "STOCK_SYNC_MAX_RETRIES_DEDUCTION": whole(0, 1000),
    "STOCK_SYNC_MAX_RETRIES_STOCK_DEDUCTED": whole(0, 1000),
    "STOCK_SYNC_MAX_RETRIES_ROLLBACK": whole(0, 1000),
    "STOCK_SYNC_RETRY_BACKOFF_BASE_S": seconds(DAY),
    "STOCK_SYNC_RETRY_BACKOFF_MAX_S": seconds(DAY),
    "STOCK_SYNC_STUCK_AFTER_S": seconds(WEEK),
    "STOCK_SYNC_SWEEP_INTERVAL_S": seconds(WEEK),
    "STOCK_SYNC_SWEEP_BATCH_SIZE": whole(1, 10_000),
    "STOCK_SYNC_LOG_LEVEL": lambda value: value in LOG_LEVELS,
    "STOCK_SYNC_TASK_EVENTS": lambda value: isinstance(value, bool),
    "STOCK_SYNC_TASK_SOFT_TIME_LIMIT_S": seconds(WEEK),
    "STOCK_SYNC_TASK_TIME_LIMIT_S": seconds(WEEK),
    "STOCK_SYNC_NOTIFICATION_SENDER": lambda value: value == "" or ":" in value,
    "STOCK_SYNC_ALERT_WEBHOOK_URL": http_url_or_empty,
    "STOCK_SYNC_ALERT_WINDOW_S": seconds(30 * DAY),
    "STOCK_SYNC_ALERT_INTERVAL_S": seconds(WEEK),
    "STOCK_SYNC_ALERT_REPEAT_S": seconds(WEEK),
    "STOCK_SYNC_ALERT_STUCK_THRESHOLD": whole(1, 1_000_000),
    "STOCK_SYNC_ALERT_ERROR_RATE_THRESHOLD": rate,
    "STOCK_SYNC_ALERT_PROCESSING_TIME_THRESHOLD_S": seconds(WEEK),
    "STOCK_SYNC_ALERT_CANCELLATION_RATE_THRESHOLD": rate,
    "STOCK_SYNC_ALERT_MIN_OPERATIONS": whole(1, 1_000_000),
    "STOCK_SYNC_METRICS_CACHE_S": lambda value: math.isfinite(value) and 0 <= value <= 3600,
    "STOCK_SYNC_WORKER_HEARTBEAT_FILE": lambda value: all(c.isprintable() for c in value),
    "STOCK_SYNC_WORKER_HEARTBEAT_INTERVAL_S": seconds(3600),
}


def value_of(settings: Settings, variable: str) -> Any:
    return getattr(settings, variable.removeprefix("STOCK_SYNC_").lower())


def out_of_bounds(settings: Settings) -> list[str]:
    """The variables whose value breaks the documented bounds (empty when all are kept)."""
    broken = [
        variable
        for variable, within in DOCUMENTED_BOUNDS.items()
        if not within(value_of(settings, variable))
    ]
    if not settings.task_soft_time_limit_s < settings.task_time_limit_s:
        broken.append("STOCK_SYNC_TASK_SOFT_TIME_LIMIT_S < STOCK_SYNC_TASK_TIME_LIMIT_S")
    if not settings.retry_backoff_base_s <= settings.retry_backoff_max_s:
        broken.append("STOCK_SYNC_RETRY_BACKOFF_BASE_S <= STOCK_SYNC_RETRY_BACKOFF_MAX_S")
    if settings.effective_maintenance_queue_name == settings.queue_name:
        broken.append("STOCK_SYNC_MAINTENANCE_QUEUE_NAME != STOCK_SYNC_QUEUE_NAME")
    if not settings.microservice_timeout_s <= settings.microservice_deadline_s:
        broken.append("STOCK_SYNC_MICROSERVICE_TIMEOUT_S <= STOCK_SYNC_MICROSERVICE_DEADLINE_S")
    return broken


@contextmanager
def environment(variables: Mapping[str, str]) -> Iterator[None]:
    """Run with exactly ``variables`` as the STOCK_SYNC_* environment, then put it back.

    (Not monkeypatch: hypothesis runs many examples inside one test function.)
    """
    saved = {name: value for name, value in os.environ.items() if name.startswith("STOCK_SYNC_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(variables)
    try:
        yield
    finally:
        for name in [name for name in os.environ if name.startswith("STOCK_SYNC_")]:
            del os.environ[name]
        os.environ.update(saved)
        # settings (and the services built from them) read inside must not outlive it
        get_settings.cache_clear()
        reset_services()

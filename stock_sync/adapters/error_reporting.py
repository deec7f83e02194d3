"""Error reporting: the :class:`ErrorReporter` port the services call when an operation ends
FAILED, and its Sentry implementation, the optional extra ``stock-sync[sentry]``.

Sentry is on in a process when ``SENTRY_DSN`` is set (sentry-sdk reads it, with
``SENTRY_ENVIRONMENT`` and ``SENTRY_RELEASE``, itself) and the extra is installed:

- an operation that ends FAILED is one event (level error) tagged ``operation_id``, ``stage``
  and ``error_type``, grouped by stage and error type; sent once the FAILED status committed,
  so exactly once per operation;
- a scheduled retry is not an event: Celery's ``Retry`` is ignored by the Celery integration,
  and log records are breadcrumbs only (the retries' ERROR lines would otherwise each be one);
- an exception that escapes a task (a sweep, an alert evaluation) is an event, from the
  Celery integration;
- every string of an event (message, breadcrumbs, tags, exception values) passes through
  stock_sync.adapters.redaction before it leaves: URL passwords, secret query values and the
  configured secrets are masked; stack frames carry no local variables;
- ``STOCK_SYNC_SENTRY_CRONS=1``: beat's schedule is reported as Sentry cron monitors (the
  Celery integration's ``monitor_beat_tasks``: beat checks each run in, the worker checks it
  out).

Set up per process, never at import time: the worker's main process (``celeryd_init``, before
the pool forks; sentry-sdk restarts its sender thread in each child), beat (``beat_init``), and
any other process (the CLI, a shop backend submitting orders) when the composition root builds
its services. A process that initialised sentry-sdk itself keeps its own client and options.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

from stock_sync.adapters.redaction import redact_data
from stock_sync.adapters.settings import get_settings

logger = logging.getLogger("stock_sync.error_reporting")

DSN_VARIABLE = "SENTRY_DSN"
EVENT_FINGERPRINT = "stock-sync-operation-failed"


@dataclass(frozen=True)
class FailedOperation:
    """An operation that has just ended FAILED: what an error tracker needs to know."""

    operation_id: uuid.UUID
    order_id: str | None
    stage: str
    error_type: str
    error: str  # one line
    reason: str

    @property
    def message(self) -> str:
        return f"operation failed in {self.stage}: {self.error_type}: {self.error}"


class ErrorReporter(Protocol):
    """Told about every operation that ends FAILED, once, after the change committed."""

    def operation_failed(self, failure: FailedOperation) -> None: ...


class NoErrorReporter:
    """The default: reports nothing (no SENTRY_DSN, or no sentry-sdk)."""

    def operation_failed(self, failure: FailedOperation) -> None:
        pass


NO_ERROR_REPORTER = NoErrorReporter()


class SentryErrorReporter:
    """One Sentry event per failed operation; a reporting error is logged, never raised (the
    operation's FAILED status is committed already)."""

    def operation_failed(self, failure: FailedOperation) -> None:
        import sentry_sdk

        try:
            sentry_sdk.capture_message(
                failure.message,
                level="error",
                tags={
                    "operation_id": str(failure.operation_id),
                    "stage": failure.stage,
                    "error_type": failure.error_type,
                },
                # Grouped by where and why, not by operation: one issue per kind of failure.
                fingerprint=[EVENT_FINGERPRINT, failure.stage, failure.error_type],
                contexts={
                    "operation": {
                        "operation_id": str(failure.operation_id),
                        "order_id": failure.order_id,
                        "stage": failure.stage,
                        "error_type": failure.error_type,
                        "error": failure.error,
                        "reason": failure.reason,
                    }
                },
            )
        except Exception:
            logger.exception("could not report the failed operation to Sentry")


def scrub_event(event: dict[str, Any], _hint: Any = None) -> dict[str, Any]:
    """``before_send``: the event with every string redacted (URL passwords, secret query
    values, the configured secrets), breadcrumbs and exception values included."""
    scrubbed: dict[str, Any] = redact_data(event)
    return scrubbed


_started_pid: int | None = None
_lock = threading.Lock()


def start_error_reporting(process: str | None = None) -> bool:
    """Initialise sentry-sdk in this process when SENTRY_DSN is set; returns whether Sentry
    is on here (also when the process initialised it itself). ``process`` (worker, beat;
    default: the program's name) becomes the tag ``stock_sync.process``."""
    global _started_pid
    process = process or os.path.basename(sys.argv[0]) or "python"
    if not os.environ.get(DSN_VARIABLE, "").strip():
        return False
    try:
        import sentry_sdk
        from sentry_sdk.integrations.celery import CeleryIntegration
        from sentry_sdk.integrations.logging import LoggingIntegration
    except ImportError:
        with _lock:
            if _started_pid != os.getpid():
                _started_pid = os.getpid()
                logger.warning(
                    "%s is set but sentry-sdk is not installed "
                    "(pip install 'stock-sync[sentry]'): errors are not reported",
                    DSN_VARIABLE,
                    extra={"action": "error_reporting_unavailable"},
                )
        return False
    with _lock:
        if sentry_sdk.get_client().is_active():
            return True  # ours (inherited through a fork included), or the process's own
        sentry_sdk.init(
            release=os.environ.get("SENTRY_RELEASE") or f"stock-sync@{_version()}",
            integrations=[
                CeleryIntegration(monitor_beat_tasks=get_settings().sentry_crons),
                # Records become breadcrumbs, never events: a retry logs at ERROR.
                LoggingIntegration(level=logging.INFO, event_level=None),
            ],
            before_send=scrub_event,  # type: ignore[arg-type]  # an Event is a dict
            include_local_variables=False,  # locals may hold URLs and settings with secrets
        )
        sentry_sdk.get_global_scope().set_tag("stock_sync.process", process)
        _started_pid = os.getpid()
    logger.info("error reporting to Sentry on", extra={"action": "error_reporting_started"})
    return True


def stop_error_reporting(timeout_s: float = 10.0) -> None:
    """Send what is queued and switch Sentry off in this process (tests)."""
    global _started_pid
    import sentry_sdk

    client = sentry_sdk.get_client()
    if client.is_active():
        client.flush(timeout=timeout_s)
        client.close(timeout=timeout_s)
    sentry_sdk.get_global_scope().set_client(None)
    _started_pid = None


def process_error_reporter() -> ErrorReporter:
    """The reporter for services built in this process: Sentry's when it is on (started here
    if SENTRY_DSN asks for it), else one that reports nothing."""
    return SentryErrorReporter() if start_error_reporting() else NO_ERROR_REPORTER


def _version() -> str:
    try:
        return version("stock-sync")
    except PackageNotFoundError:
        return "unknown"

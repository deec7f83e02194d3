"""The Celery application and its process-level signal handlers."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery._state import get_current_task
from celery.signals import (
    beat_init,
    celeryd_after_setup,
    celeryd_init,
    setup_logging,
    worker_init,
    worker_process_init,
)

from stock_sync.adapters.db import reset_databases
from stock_sync.adapters.error_reporting import start_error_reporting
from stock_sync.adapters.instrumentation import count_sql_if_asked
from stock_sync.adapters.logging_setup import (
    TaskContextFilter,
    configure_json_logging,
    worker_log_level,
)
from stock_sync.adapters.settings import (
    exit_on_configuration_error,
    get_settings,
    prepare_broker_folders,
)
from stock_sync.adapters.telemetry import start_tracing
from stock_sync.composition import reset_services
from stock_sync.services.health import log_embedded_warning
from tasks.heartbeat import HeartbeatFile

# `celery -A tasks worker|beat|flower` with a bad setting: one line and exit 1 (2 for an
# unknown STOCK_SYNC_* variable), before Celery gets to wrap the error in its own traceback.
with exit_on_configuration_error():
    get_settings()

app = Celery("stock_sync")
app.config_from_object("celeryconfig")
app.steps["worker"].add(HeartbeatFile)  # the worker's liveness file (tasks/heartbeat.py)
count_sql_if_asked()  # the benchmark's SQL counters; inert unless STOCK_SYNC_COUNT_SQL_DIR is set


@setup_logging.connect
def configure_worker_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """JSON lines for every record, each carrying the task and the operation it works on.

    The level: ``--loglevel`` when given on the command line, else STOCK_SYNC_LOG_LEVEL.
    """
    handler = configure_json_logging(worker_log_level(loglevel, get_settings().log_level))
    handler.addFilter(TaskContextFilter(get_current_task))


@worker_process_init.connect
def build_fresh_connections(**_: Any) -> None:
    """A forked child must not reuse its parent's database or HTTP connections; it traces
    with exporters of its own (OTEL_TRACES_EXPORTER: stock_sync/adapters/telemetry.py)."""
    reset_databases(close=False)
    reset_services()
    start_tracing("worker")


@worker_init.connect
def trace_a_worker_that_runs_tasks_itself(sender: Any = None, **_: Any) -> None:
    """The solo and threads pools run tasks in the worker's own process: it traces them.
    Prefork's children set their tracing up each (``worker_process_init``)."""
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool as PreforkPool

    pool = get_implementation(getattr(sender, "pool_cls", None) or "prefork")
    if not (isinstance(pool, type) and issubclass(pool, PreforkPool)):
        start_tracing("worker")


def refuse_without_servers() -> None:
    """A worker or beat works with the database and the broker: without their URLs (outside
    the embedded set-up) it refuses to start, one line naming the variables, exit 1; on the
    filesystem transport it makes the broker's folders."""
    with exit_on_configuration_error():
        settings = get_settings()
        settings.require_servers(database=True, broker=True)
        prepare_broker_folders(settings)


@celeryd_init.connect
def report_worker_errors(**_: Any) -> None:
    """Sentry (SENTRY_DSN) in the worker, before its pool forks: the children inherit it."""
    refuse_without_servers()
    start_error_reporting("worker")


@beat_init.connect
def observe_beat(**_: Any) -> None:
    """Beat's sends start the traces of the sweeps and alert evaluations; Sentry reports its
    errors and, with STOCK_SYNC_SENTRY_CRONS, checks each scheduled run in. (Its scheduler
    refused to start without the database or the broker already: tasks/beat.py.)"""
    start_tracing("beat")
    start_error_reporting("beat")


@celeryd_after_setup.connect
def warn_on_the_embedded_default(**_: Any) -> None:
    """A worker started on the embedded default says so once, at WARNING: a production host
    that lost its STOCK_SYNC_DATABASE_URL would otherwise run on a private SQLite file.
    (This signal follows the logging set-up: the record is a JSON line like the others.)"""
    log_embedded_warning(get_settings(), "worker")

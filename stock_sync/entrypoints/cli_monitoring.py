"""Monitoring commands: ``stock-sync stats`` and ``stock-sync metrics-server``.

cli.py registers them (``cli.add_command``); they import it lazily to keep the import acyclic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import click
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from sqlalchemy.exc import SQLAlchemyError

from stock_sync.adapters.db import Database, describe_database_error, get_database
from stock_sync.adapters.logging_setup import configure_json_logging, configure_server_logging
from stock_sync.adapters.settings import Settings, get_settings
from stock_sync.entrypoints import render
from stock_sync.entrypoints.cli_common import emit, fail, needs
from stock_sync.entrypoints.cli_params import PLAIN_TEXT
from stock_sync.services.health import (
    DATABASE,
    MICROSERVICE_PROBE_CACHE_S,
    CachedProbe,
    microservice_up,
    readiness_app,
)
from stock_sync.services.metrics import (
    FINISHED_STATUSES,
    LIVE_STATUSES,
    MICROSERVICE_UP_HELP,
    DatabaseCollector,
    MetricsCache,
    MetricsSnapshot,
    UpCollector,
    queue_length,
    read_metrics,
)

logger = logging.getLogger("stock_sync.metrics_server")
IDLE_TIMEOUT_S = 30.0

QueueLengthFn = Callable[[], int | None]


def _broker_queue_length(settings: Settings) -> QueueLengthFn:
    """Asks the configured broker; importing tasks reads the Celery configuration."""
    from tasks.app import app

    return lambda: queue_length(app, settings.queue_name)


def snapshot_now(
    database: Database, settings: Settings, queue_length_fn: QueueLengthFn | None = None
) -> MetricsSnapshot:
    """The metrics at this moment; the broker is asked before the database transaction.

    A broker that does not answer is logged (one line) and reported as down."""
    queue = queue_length_fn() if queue_length_fn is not None else None
    broker_up = None if queue_length_fn is None else queue is not None
    if broker_up is False:
        logger.error(
            "metrics: the broker does not answer; stock_sync_queue_length %s left out",
            settings.queue_name,
            extra={"action": "metrics_broker_down"},
        )
    return read_metrics(
        database, settings, now=datetime.now(UTC), queue_length=queue, broker_up=broker_up
    )


# --- stats ----------------------------------------------------------------------------------


def _ids(ids: tuple[str, ...]) -> str:
    return ", ".join(ids) if ids else "-"


def render_stats(snapshot: MetricsSnapshot) -> str:
    """The human rendering of ``stock-sync stats``."""
    rows: list[tuple[str, Any]] = [
        *((f"operations {status}", snapshot.live(status)) for status in LIVE_STATUSES),
        *((f"finished {status}", snapshot.finished(status)) for status in FINISHED_STATUSES),
        ("created", snapshot.created_in_window),
        ("processing seconds avg", f"{snapshot.processing_seconds_avg:.3f}"),
        ("processing seconds p95", f"{snapshot.processing_seconds_p95:.3f}"),
        ("error ratio", f"{snapshot.error_ratio:.3f}"),
        ("cancellations", snapshot.cancellations),
        ("cancellation ratio", f"{snapshot.cancellation_ratio:.3f}"),
        ("stuck operations", snapshot.stuck_count),
        *((f"errors {kind}", count) for kind, count in sorted(snapshot.errors_by_type.items())),
    ]
    if snapshot.queue_length is not None:
        rows.append((f"queue {snapshot.queue_name}", snapshot.queue_length))
    return "\n".join(
        [
            f"stock-sync metrics over the last {snapshot.window_s:g}s"
            f" (at {snapshot.generated_at.isoformat(timespec='seconds')})",
            render.table(("metric", "value"), rows),
            f"stuck: {_ids(snapshot.stuck_sample_ids)}",
            f"slowest completed: {_ids(snapshot.slowest_operation_ids)}",
        ]
    )


@click.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@needs(database=True, broker=True)
def stats(as_json: bool) -> None:
    """Print the monitoring metrics: statuses, processing times, errors, cancellations
    (reads only)."""
    settings = get_settings()
    database = get_database(settings, read_only=True)
    snapshot = snapshot_now(database, settings, _broker_queue_length(settings))
    emit(as_json, snapshot.to_dict(), lambda: render_stats(snapshot))


# --- metrics-server -------------------------------------------------------------------------

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def healthz_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """Liveness: "ok" whenever the process serves, whatever the database or broker say."""
    body = b"ok\n"
    start_response(
        "200 OK",
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
    )
    return [body] if environ.get("REQUEST_METHOD") != "HEAD" else []


def not_found_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    body = b"not found: try /metrics\n"
    start_response(
        "404 Not Found",
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
    )
    return [body]


def answering_head(app: WsgiApp) -> WsgiApp:
    """``app`` with HEAD answered as GET without the body: prometheus_client's app (0.26)
    refuses HEAD with 405."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "HEAD":
            return app(environ, start_response)
        for _ in app({**environ, "REQUEST_METHOD": "GET"}, start_response):
            pass  # the headers (Content-Length included) are those of the GET
        return []

    return wrapped


def dispatch(routes: Mapping[str, WsgiApp]) -> WsgiApp:
    """One WSGI app that hands each request to the app of its exact path (404 otherwise)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        return routes.get(environ.get("PATH_INFO", ""), not_found_app)(environ, start_response)

    return app


def metrics_registry(
    cache: MetricsCache,
    database_url: str = "",
    microservice_probe: Callable[[], bool] | None = None,
) -> CollectorRegistry:
    """stock-sync's figures (database as the source, through ``cache``), the microservice's
    reachability when a probe is given, and prometheus_client's process, platform and
    garbage-collector metrics, in one registry."""
    registry = CollectorRegistry(auto_describe=False)
    if microservice_probe is not None:
        registry.register(
            UpCollector("stock_sync_microservice_up", MICROSERVICE_UP_HELP, microservice_probe)
        )

    def database_failed(error: Exception) -> None:
        assert isinstance(error, SQLAlchemyError)  # the only failure the collector catches
        reason = describe_database_error(error, database_url)
        logger.error(
            "metrics: database unavailable, stock_sync_database_up 0: %s",
            reason,
            extra={"action": "metrics_failed"},
        )

    registry.register(
        DatabaseCollector(cache.get, failure=SQLAlchemyError, on_failure=database_failed)
    )
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def metrics_server_app(
    registry: CollectorRegistry, extra_routes: Mapping[str, WsgiApp] | None = None
) -> WsgiApp:
    """The metrics server's WSGI app: ``/metrics`` is prometheus_client's own app (gzip,
    OpenMetrics negotiation, OPTIONS; HEAD added here), ``/healthz`` the liveness probe.

    The place to mount another route (``/readyz`` from stock_sync/services/health.py) is
    ``extra_routes``, or the ``routes`` dict below."""
    routes: dict[str, WsgiApp] = {
        "/metrics": answering_head(make_wsgi_app(registry)),
        "/healthz": healthz_app,
        **(extra_routes or {}),
    }
    return dispatch(routes)


class MetricsRequestHandler(WSGIRequestHandler):
    """wsgiref's handler with an idle timeout, and its request lines logged at DEBUG."""

    # One request per connection (wsgiref answers HTTP/1.0 and closes): no keep-alive stalls.
    disable_nagle_algorithm = True
    server: MetricsServer

    def setup(self) -> None:
        super().setup()
        # A connection that sends nothing for this long is closed instead of holding a
        # thread forever.
        self.connection.settimeout(self.server.idle_timeout_s)

    def handle(self) -> None:
        try:
            super().handle()
        except TimeoutError:
            self.close_connection = True  # idle past the timeout: the connection is closed

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(format, *args)  # a scrape every few seconds is not worth a line each


class MetricsServer(ThreadingMixIn, WSGIServer):
    """A threaded wsgiref server (one thread per connection) for :func:`metrics_server_app`."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        app: WsgiApp,
        *,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.idle_timeout_s = idle_timeout_s
        super().__init__(address, MetricsRequestHandler)
        self.set_app(app)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("metrics server: request from %s failed", client_address[0])


def make_metrics_server(
    database: Database,
    settings: Settings,
    host: str,
    port: int,
    queue_length_fn: QueueLengthFn | None = None,
    *,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    microservice_probe: Callable[[], bool] | None = None,
) -> MetricsServer:
    """A bound, not yet serving, metrics server (port 0 picks a free port: see server_port).

    Scrapes within ``settings.metrics_cache_s`` of each other share one computation; a
    connection idle for ``idle_timeout_s`` is closed; ``microservice_probe`` answers
    ``stock_sync_microservice_up``. Raises OSError when it cannot bind.
    """
    cache = MetricsCache(
        lambda: snapshot_now(database, settings, queue_length_fn), settings.metrics_cache_s
    )
    # /readyz: this process is ready when its database answers at the migration head (what it
    # serves comes from there); beat, the broker and the microservice are other processes'
    # business: their figures and alerts. /healthz stays the liveness probe.
    registry = metrics_registry(cache, database.url, microservice_probe)
    app = metrics_server_app(registry, {"/readyz": readiness_app(settings, only=(DATABASE,))})
    return MetricsServer((host, port), app, idle_timeout_s=idle_timeout_s)


@click.command("metrics-server")
@click.option("--host", type=PLAIN_TEXT, default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=9808, show_default=True)
@needs(database=True, broker=True)
def metrics_server(host: str, port: int) -> None:
    """Serve Prometheus metrics on /metrics, liveness on /healthz and readiness (its database
    answers at the migration head) on /readyz until Ctrl-C."""
    settings = get_settings()
    configure_server_logging(settings.log_level)  # its own records as JSON, at its level
    probe = CachedProbe(lambda: microservice_up(settings), MICROSERVICE_PROBE_CACHE_S)
    try:
        server = make_metrics_server(
            get_database(settings),
            settings,
            host,
            port,
            _broker_queue_length(settings),
            microservice_probe=probe.get,
        )
    except (OSError, UnicodeError, ValueError, OverflowError) as error:
        # taken port, unknown host, no permission; UnicodeError: an unencodable host name
        reason = getattr(error, "strerror", None) or str(error)
        fail(f"cannot listen on {host}:{port}: {reason}")
    click.echo(f"serving metrics on http://{host}:{server.server_port}/metrics")
    with contextlib.suppress(KeyboardInterrupt), server:  # Ctrl-C is the way to stop it
        server.serve_forever()


# --- flower ---------------------------------------------------------------------------------

FLOWER_CREDENTIALS_VARIABLE = "FLOWER_BASIC_AUTH"
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1", "localhost")


def _basic_auth_problem(credentials: str) -> str | None:
    """What is wrong with FLOWER_BASIC_AUTH's shape (never quoting it), or None."""
    for pair in credentials.split(","):
        user, separator, password = pair.partition(":")
        if not (user.strip() and separator and password):
            return (
                f"{FLOWER_CREDENTIALS_VARIABLE} must be user:password (several separated by commas)"
            )
    return None


# The Flower process starts here: JSON logging first, then Celery's command line as `celery`.
_FLOWER_BOOT = "from stock_sync.entrypoints.cli_monitoring import run_flower; run_flower()"


def flower_argv(address: str, port: int, extra: Sequence[str]) -> list[str]:
    """``celery -A tasks flower`` for ``address:port``, run by :func:`run_flower` so that it
    logs JSON; credentials stay in the environment (Flower reads FLOWER_BASIC_AUTH itself),
    where ``ps`` does not show them.

    ``--logging=none`` keeps tornado's option parser from setting the root level (it would
    force INFO over STOCK_SYNC_LOG_LEVEL); a later ``--logging=...`` among ``extra`` wins.
    """
    flower = ["-A", "tasks", "flower", f"--address={address}", f"--port={port}", "--logging=none"]
    return [sys.executable, "-c", _FLOWER_BOOT, *flower, *extra]


def run_flower() -> None:
    """Flower (``celery ... flower`` with this process's arguments) logging like every other
    stock-sync process: JSON lines on stderr at STOCK_SYNC_LOG_LEVEL, passwords masked.

    Tornado, Flower and Celery log through the root logger; tornado adds its own plain-text
    handler only to a root logger that has none, so the JSON handler goes in first.
    """
    from celery.bin.celery import main as celery_main

    configure_json_logging(get_settings().log_level)
    sys.argv[0] = str(Path(sys.executable).with_name("celery"))
    celery_main()


def _refuse_unsafe_flower(address: str, local_only: bool, extra: Sequence[str]) -> None:
    if any(arg.startswith(("--basic-auth", "--basic_auth")) for arg in extra):
        fail(
            f"pass credentials in {FLOWER_CREDENTIALS_VARIABLE}, "
            "not on the command line (ps shows it)"
        )
    credentials = os.environ.get(FLOWER_CREDENTIALS_VARIABLE, "")
    if credentials:
        problem = _basic_auth_problem(credentials)
        if problem:
            fail(problem)
        return
    if not local_only:
        fail(
            f"{FLOWER_CREDENTIALS_VARIABLE} is not set: export it as user:password (Flower "
            "reads it from the environment), or pass --local-only for a dashboard without "
            "authentication on localhost"
        )
    if address not in LOOPBACK_ADDRESSES:
        fail(
            f"--local-only serves without authentication, so only on a loopback address "
            f"({', '.join(LOOPBACK_ADDRESSES)}), not {address}"
        )


@click.command(
    "flower", context_settings={"ignore_unknown_options": True, "allow_extra_args": True}
)
@click.option("--address", type=PLAIN_TEXT, default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=5555, show_default=True)
@click.option(
    "--local-only",
    is_flag=True,
    help="Allow running without FLOWER_BASIC_AUTH, on a loopback address only.",
)
@click.pass_context
@needs(broker=True)
def flower(ctx: click.Context, address: str, port: int, local_only: bool) -> None:
    """Run Flower (celery flower) on ADDRESS:PORT behind basic authentication.

    The credentials come from the FLOWER_BASIC_AUTH environment variable (user:password,
    several separated by commas), which Flower reads itself: never on the command line, where
    ps shows them. Without it Flower is refused, unless --local-only is given and the address
    is a loopback one. Extra arguments go to 'celery flower'.
    """
    get_settings()  # a bad setting is refused here in one line, before Flower starts
    _refuse_unsafe_flower(address, local_only, ctx.args)
    argv = flower_argv(address, port, ctx.args)
    os.execv(argv[0], argv)  # Flower replaces this process: Ctrl-C and signals reach it

"""The metrics server's parts: its WSGI apps (``/metrics``, ``/healthz``, ``/readyz``), its
registry and its threaded HTTP server. ``stock-sync metrics-server``
(stock_sync/entrypoints/cli_monitoring.py) starts one.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from sqlalchemy.exc import SQLAlchemyError

from stock_sync.adapters.db import Database, describe_database_error
from stock_sync.adapters.probes import queue_length
from stock_sync.adapters.settings import Settings
from stock_sync.entrypoints.metrics_exposition import (
    MICROSERVICE_UP_HELP,
    DatabaseCollector,
    MetricsCache,
    UpCollector,
)
from stock_sync.services.health import (
    DATABASE,
    DEFAULT_TIMEOUT_S,
    HealthReport,
    run_health_checks,
)
from stock_sync.services.metrics import MetricsSnapshot, read_metrics

logger = logging.getLogger("stock_sync.metrics_server")
IDLE_TIMEOUT_S = 30.0

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

QueueLengthFn = Callable[[], int | None]


def broker_queue_length(settings: Settings) -> QueueLengthFn:
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


# --- WSGI apps ------------------------------------------------------------------------------


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

    The place to mount another route (``/readyz``: :func:`readiness_app`) is
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


def readiness_app(
    settings: Settings,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    only: Collection[str] | None = None,
) -> WsgiApp:
    """A WSGI app for ``/readyz``: 200 and the JSON report when ready, 503 when a check
    failed, 405 for anything but GET and HEAD. Requests arriving while a run is under way
    share its report, so a burst of probes opens one set of connections, not one per probe."""
    lock = threading.Lock()
    latest: list[tuple[float, HealthReport]] = []  # (when it finished, the report)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response(
                "405 Method Not Allowed",
                [("Content-Type", "text/plain; charset=utf-8"), ("Allow", "GET, HEAD")],
            )
            return [b"method not allowed\n"]
        arrived = time.monotonic()
        with lock:
            if latest and latest[0][0] >= arrived:
                report = latest[0][1]  # finished while this request waited for it
            else:
                report = run_health_checks(settings, timeout_s=timeout_s, only=only)
                latest[:] = [(time.monotonic(), report)]
        body = (json.dumps(report.to_dict()) + "\n").encode()
        status = "200 OK" if report.ready else "503 Service Unavailable"
        start_response(
            status,
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [] if method == "HEAD" else [body]

    return app

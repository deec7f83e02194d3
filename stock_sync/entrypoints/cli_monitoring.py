"""Monitoring commands: ``stock-sync stats``, ``stock-sync metrics-server`` (its parts:
stock_sync/entrypoints/metrics_server.py) and ``stock-sync flower``.

cli.py registers them (``cli.add_command``); they import it lazily to keep the import acyclic.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from stock_sync.adapters.db import get_database
from stock_sync.adapters.logging_setup import configure_json_logging, configure_server_logging
from stock_sync.adapters.settings import get_settings
from stock_sync.entrypoints import render
from stock_sync.entrypoints.cli_common import emit, fail, needs
from stock_sync.entrypoints.cli_params import PLAIN_TEXT
from stock_sync.entrypoints.metrics_exposition import CachedProbe
from stock_sync.entrypoints.metrics_server import (
    broker_queue_length,
    make_metrics_server,
    snapshot_now,
)
from stock_sync.services.health import MICROSERVICE_PROBE_CACHE_S, microservice_up
from stock_sync.services.metric_reads import FINISHED_STATUSES, LIVE_STATUSES
from stock_sync.services.metrics import MetricsSnapshot

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
    snapshot = snapshot_now(database, settings, broker_queue_length(settings))
    emit(as_json, snapshot.to_dict(), lambda: render_stats(snapshot))


# --- metrics-server -------------------------------------------------------------------------


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
            broker_queue_length(settings),
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

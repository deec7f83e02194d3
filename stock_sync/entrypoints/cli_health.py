"""``stock-sync health``: is this deployment able to do its work right now?

cli.py adds the ``health`` command to the ``stock-sync`` group.
"""

from __future__ import annotations

import sys

import click

from stock_sync.adapters.redaction import printable_lines
from stock_sync.adapters.settings import get_settings
from stock_sync.entrypoints import render
from stock_sync.entrypoints.cli_common import emit, needs
from stock_sync.entrypoints.cli_params import FiniteFloatRange
from stock_sync.services.health import (
    CHECK_NAMES,
    DEFAULT_TIMEOUT_S,
    EMBEDDED_DEFAULT,
    HealthReport,
    embedded_warning,
    run_health_checks,
)

EXIT_CHECK_FAILED = 1


@click.command("health")
@click.option(
    "--only",
    "only",
    type=click.Choice(CHECK_NAMES),
    multiple=True,
    help="Run only this check (repeat for several); all by default.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=FiniteFloatRange(0.1, 60),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Seconds each check may take (they run concurrently).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@needs(database=True, broker=True)
def health(only: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """Check the database (reachable, at the migration head), the broker, the microservice,
    this host's worker (its heartbeat file), beat (it sent an entry recently), the maintenance
    tasks (a worker ran the sweep, the release of parked retries and the alert evaluation
    recently) and whether this runs on the embedded default (a loud warning). With no worker
    on this host its check is a warning, unless asked for alone (--only worker).

    Exit status: 0 every check passed (warnings allowed), 1 a check failed (or the
    configuration is invalid), 2 a usage error.
    """
    settings = get_settings()
    report = run_health_checks(settings, timeout_s=timeout_s, only=only or None)
    emit(as_json, report.to_dict(), lambda: render_health(report))
    warning = embedded_warning(settings)
    if warning and report.check(EMBEDDED_DEFAULT) is not None:
        # stderr: loud on a terminal, and stdout stays the report (JSON stays parseable)
        click.echo(printable_lines(warning), err=True)
    if not report.ready:
        sys.exit(EXIT_CHECK_FAILED)


def render_health(report: HealthReport) -> str:
    rows = [(check.name, check.status.upper(), check.detail) for check in report.checks]
    verdict = "ready" if report.ready else f"NOT READY: {', '.join(report.failed)} failed"
    return f"{render.table(('check', 'status', 'detail'), rows)}\n{verdict}"

"""The ``stock-sync`` command line: human output by default, ``--json`` where asked."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from stock_sync import render, schema
from stock_sync.db import get_database
from stock_sync.domain.errors import EnqueueFailed, StockSyncError
from stock_sync.domain.statuses import OperationStatus
from stock_sync.queries import list_operations, operation_details
from stock_sync.settings import get_settings
from stock_sync.stock_ledger import get_stock, set_stock, validate_sku

EXIT_NOT_ENQUEUED = 3  # saved as PENDING, not enqueued: the sweep will re-drive it
EXIT_ROLLBACK_UNSETTLED = 4  # cancelled, but the microservice rollback is pending or failed


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error and exit non-zero; never a traceback."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable url>"


def _database_problem(error: SQLAlchemyError) -> str:
    text = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    url = _safe_url(get_settings().effective_database_url)
    if ("does not exist" in text and "relation" in text) or "no such table" in text:
        return f"the database at {url} has no schema yet: run 'stock-sync db upgrade'"
    if "connect" in text.lower():
        return f"cannot reach the database at {url}: {text}"
    return f"database error at {url}: {text}"


class StockSyncGroup(click.Group):
    """Turns our errors into one-line messages with a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StockSyncError as error:
            fail(str(error))
        except SQLAlchemyError as error:
            fail(_database_problem(error))


def emit(as_json: bool, payload: Any, human: Callable[[], str]) -> None:
    """Print ``payload`` as JSON, or the human rendering."""
    click.echo(json.dumps(payload, indent=2, default=str) if as_json else human())


@click.group(cls=StockSyncGroup)
def cli() -> None:
    """stock-sync: keeps warehouse stock in step with Allegro orders."""


@cli.group(cls=StockSyncGroup)
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (alembic upgrade)."""
    url = get_settings().effective_database_url
    schema.upgrade(url, revision)
    click.echo(f"database at {_safe_url(url)} is at {revision}")


@db.command("downgrade")
@click.option("--revision", default="base", show_default=True)
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION (default: drop everything)."""
    url = get_settings().effective_database_url
    schema.downgrade(url, revision)
    click.echo(f"database at {_safe_url(url)} is at {revision}")


@cli.group(cls=StockSyncGroup)
def stock() -> None:
    """Stock levels."""


@stock.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("sku")
@click.argument("quantity", type=int)
def stock_set(sku: str, quantity: int) -> None:
    """Set SKU's level to QUANTITY (the change is recorded as a correction)."""
    with get_database().transaction() as session:
        change = set_stock(session, sku, quantity)
    click.echo(f"{change.sku}: {change.previous} -> {change.quantity}")


@stock.command("get")
@click.argument("sku")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stock_get(sku: str, as_json: bool) -> None:
    """Print SKU's level."""
    sku = validate_sku(sku)
    with get_database().transaction() as session:
        quantity = get_stock(session, sku)
    if quantity is None:
        fail(f"unknown SKU: {sku}")
    emit(as_json, {"sku": sku, "quantity": quantity}, lambda: f"{sku}: {quantity}")


# --- operations -----------------------------------------------------------------------


@cli.command("submit")
@click.argument("order_id")
@click.option("--account", "account_name", default=None, help="Allegro account name.")
def submit(order_id: str, account_name: str | None) -> None:
    """Record ORDER_ID's stock operation and enqueue it; prints the operation id alone."""
    from stock_sync.producer import submit_operation

    try:
        operation_id = submit_operation(order_id, account_name)
    except EnqueueFailed as error:
        click.echo(str(error.operation_id))
        click.echo(f"warning: {error}", err=True)
        sys.exit(EXIT_NOT_ENQUEUED)
    click.echo(str(operation_id))


@cli.command("show")
@click.argument("operation_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(operation_id: str, as_json: bool) -> None:
    """Print an operation, its line items and its timeline of events."""
    from stock_sync.producer import parse_operation_id

    with get_database().transaction() as session:
        details = operation_details(session, parse_operation_id(operation_id))
    emit(as_json, details, lambda: render.operation(details))


@cli.command("list")
@click.option(
    "--status",
    type=click.Choice([s.value for s in OperationStatus]),
    default=None,
    help="Only operations in this status.",
)
@click.option("--order", "order_id", default=None, help="Only this order's operations.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_command(status: str | None, order_id: str | None, limit: int, as_json: bool) -> None:
    """List operations, newest first (order deductions and adjustments alike)."""
    with get_database().transaction() as session:
        rows = list_operations(
            session,
            status=OperationStatus(status) if status else None,
            order_id=order_id,
            limit=limit,
        )
    emit(as_json, rows, lambda: render.operation_table(rows))


@cli.command("cancel")
@click.argument("operation_id")
@click.option("--by", "cancelled_by", required=True, help="Who cancels (stored).")
@click.option("--reason", required=True, help="Why (stored).")
@click.option("--wait", is_flag=True, help="Wait until the microservice rollback settles.")
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cancel(
    operation_id: str, cancelled_by: str, reason: str, wait: bool, timeout_s: float, as_json: bool
) -> None:
    """Cancel an operation and roll back what it changed; prints the CancellationResult."""
    from stock_sync.composition import get_services
    from stock_sync.producer import request_cancellation

    result = request_cancellation(operation_id, cancelled_by, reason)
    deadline = time.monotonic() + timeout_s
    while wait and result.microservice_rollback == "pending" and time.monotonic() < deadline:
        time.sleep(0.2)
        result = get_services().cancellation.result_of(result.operation_id)
    payload = result.to_dict()
    emit(as_json, payload, lambda: render.cancellation(payload))
    if wait and result.microservice_rollback in ("pending", "failed"):
        sys.exit(EXIT_ROLLBACK_UNSETTLED)


@cli.command("sweep")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def sweep(as_json: bool) -> None:
    """Re-drive stuck operations now (what the beat entry does)."""
    from stock_sync.composition import get_services
    from stock_sync.sweeps import sweeper_for

    report = sweeper_for(get_services()).sweep()
    payload = report.to_dict()
    emit(
        as_json,
        payload,
        lambda: (
            "another sweep is running: skipped"
            if not report.ran
            else f"re-driven: {len(report.redriven)}, failed: {len(report.failed)}, "
            f"not enqueued: {len(report.not_enqueued)}"
        ),
    )


@cli.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def check(as_json: bool) -> None:
    """Reconcile stock levels, the ledger and the operations; exit 1 on any mismatch."""
    from stock_sync.reconciliation import reconcile_database

    report = reconcile_database(get_database())
    payload = report.to_dict()
    emit(as_json, payload, lambda: render.reconciliation(payload))
    if not report.ok:
        sys.exit(1)


# --- processes --------------------------------------------------------------------------


@cli.command("worker", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run a Celery worker (extra arguments go to 'celery worker')."""
    from tasks import app

    app.worker_main(["worker", "--loglevel", get_settings().log_level, *ctx.args])


@cli.command("fake-microservice")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--orders", "orders_file", type=click.Path(dir_okay=False), default=None)
@click.option("--error-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--latency", "latency_s", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option("--rate-limit-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--timeout-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True)
def fake_microservice(
    host: str,
    port: int,
    orders_file: str | None,
    error_rate: float,
    latency_s: float,
    rate_limit_rate: float,
    timeout_rate: float,
) -> None:
    """Serve the microservice contract from orders held in memory (tests, demo, benchmarks)."""
    from stock_sync.fake_microservice import serve

    faults = {
        "error_rate": error_rate,
        "latency_s": latency_s,
        "rate_limit_rate": rate_limit_rate,
        "timeout_rate": timeout_rate,
    }
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the way to stop it
        serve(host=host, port=port, orders_file=orders_file, faults=faults)


def _register_monitoring_commands() -> None:
    from stock_sync.cli_monitoring import metrics_server, stats

    cli.add_command(stats)
    cli.add_command(metrics_server)


_register_monitoring_commands()


def main() -> None:
    cli(prog_name="stock-sync")

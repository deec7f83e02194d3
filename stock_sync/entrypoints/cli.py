"""The ``stock-sync`` command line: human output by default, ``--json`` where asked.

Exit status of every command: 0 done; 1 an error (bad input, refused, unknown id, unreachable
database, no database or broker configured...); 2 a usage error (unknown option, malformed
argument, an unknown STOCK_SYNC_* variable). Errors are one line
``error: ...`` on stderr with passwords and tokens masked, never a traceback. ``submit`` exits 3
when operations were saved but not enqueued, ``cancel --wait`` 4 when the microservice
rollback did not settle, ``check`` 1 on a mismatch and 2 when it could not run, ``health`` 1
when a check failed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from importlib.metadata import EntryPoints, entry_points
from typing import Any, cast

import click

from stock_sync.adapters import schema
from stock_sync.adapters.db import configured_database_url, get_database, reset_databases
from stock_sync.adapters.logging_setup import configure_cli_logging
from stock_sync.adapters.redaction import one_line, redact_url
from stock_sync.adapters.settings import EMBEDDED_VARIABLE, get_settings
from stock_sync.adapters.stock_ledger import get_stock, set_stock, validate_sku
from stock_sync.domain.errors import ConfigurationError, UnknownSetting
from stock_sync.domain.statuses import OperationStatus
from stock_sync.entrypoints import cli_common, render
from stock_sync.entrypoints.cli_common import (
    EXIT_CHECK_COULD_NOT_RUN,
    EXIT_CHECK_MISMATCH,
    EXIT_INTERRUPTED,
    EXIT_ROLLBACK_UNSETTLED,
    EXIT_USAGE,
    StockSyncGroup,
    describe_failure,
    emit,
    fail,
    needs,
)
from stock_sync.entrypoints.cli_health import health
from stock_sync.entrypoints.cli_monitoring import flower, metrics_server, stats
from stock_sync.entrypoints.cli_params import DURATION, PLAIN_TEXT, QUANTITY, FiniteFloatRange
from stock_sync.entrypoints.cli_retry import retry
from stock_sync.entrypoints.cli_rollback import rollback
from stock_sync.entrypoints.cli_settings import settings
from stock_sync.entrypoints.cli_submit import submit
from stock_sync.services.queries import list_operations, operation_details

PLUGIN_COMMANDS = "stock_sync.commands"


def _plugin_entries() -> EntryPoints:
    return entry_points(group=PLUGIN_COMMANDS)


# click 8.2+ raises this for a group called without a command (8.1 printed the help itself).
NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _usage_problem(error: click.ClickException) -> str:
    message = error.format_message()
    context = getattr(error, "ctx", None)
    if isinstance(error, click.UsageError) and context is not None:
        message += f" (see '{context.command_path} --help')"
    return message


class StockSyncCli(StockSyncGroup):
    """The root command: click's usage errors become one ``error:`` line as well, and an
    unexpected exception one line naming its type rather than a traceback.

    It also offers the commands other packages add (entry point group
    ``stock_sync.commands``: the development tools' ``fake-microservice``), loaded only when
    one is asked for, so the runtime command line never imports them."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *(e.name for e in _plugin_entries())})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            for entry in _plugin_entries():
                if entry.name == cmd_name:
                    return cast(click.Command, entry.load())
        return command

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except NO_ARGS_IS_HELP as error:
            error.show()  # plain `stock-sync`: the help, as click prints it
            sys.exit(error.exit_code)
        except click.ClickException as error:
            fail(_usage_problem(error), error.exit_code)
        except click.Abort:
            fail("aborted: nothing changed")
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except Exception as error:  # the last guard: one line, never a traceback
            fail(describe_failure(error))
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=StockSyncCli)
# The installed distribution's version (importlib.metadata), e.g. "stock-sync 0.1.0".
@click.version_option(
    package_name="stock-sync", prog_name="stock-sync", message="%(prog)s %(version)s"
)
@click.option(
    "--embedded",
    is_flag=True,
    help="The embedded demo set-up where no URL is set: a SQLite file and Celery's filesystem "
    "transport under STOCK_SYNC_DATA_DIR (as STOCK_SYNC_EMBEDDED=1). Never for production.",
)
def cli(embedded: bool) -> None:
    """stock-sync: keeps warehouse stock in step with Allegro orders.

    Without STOCK_SYNC_DATABASE_URL and STOCK_SYNC_BROKER_URL a command that needs them refuses
    to run, unless --embedded (or STOCK_SYNC_EMBEDDED=1) asks for the embedded demo set-up.

    Exit status: 0 done, 1 an error (one 'error:' line on stderr), 2 a usage error (an unknown
    STOCK_SYNC_* variable included); see each command's help for its own codes.
    """
    if embedded:
        # The process's environment: what it starts (Flower's celery, a worker) inherits it.
        os.environ[EMBEDDED_VARIABLE] = "1"
        get_settings.cache_clear()
    try:
        get_settings()  # every command refuses a bad or unknown setting before anything else
    except UnknownSetting as error:
        fail(str(error), EXIT_USAGE)
    except ConfigurationError as error:
        fail(str(error))
    configure_cli_logging()


@cli.group(cls=StockSyncGroup)
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", type=PLAIN_TEXT, default="head", show_default=True)
@needs(database=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (alembic upgrade)."""
    url = configured_database_url(get_settings())
    schema.upgrade(url, revision)
    click.echo(f"database at {redact_url(url)} is at {revision}")


# ignore_unknown_options: alembic's relative revisions ("-1") look like options to click.
@db.command("downgrade", context_settings={"ignore_unknown_options": True})
@click.argument("revision", type=PLAIN_TEXT)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (for scripts).")
@needs(database=True)
def db_downgrade(revision: str, yes: bool) -> None:
    """Revert migrations down to REVISION ('base' drops every table and its data; '-1' goes
    one step back).

    Asks for confirmation unless --yes is given; without --yes it refuses to run when stdin
    is not a terminal.
    """
    url = configured_database_url(get_settings())
    if not yes:
        _confirm_downgrade(url, revision)
    schema.downgrade(url, revision)
    click.echo(f"database at {redact_url(url)} is at {revision}")


@db.command("current")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@needs(database=True)
def db_current(as_json: bool) -> None:
    """Print the database's revision and whether it is the latest (the head); reads only
    (a missing SQLite file is reported, never created)."""
    url = configured_database_url(get_settings(), read_only=True)
    state = schema.current(url)
    payload = {"database": redact_url(url), **state.to_dict()}
    emit(as_json, payload, lambda: render_current(redact_url(url), state))


def render_current(where: str, state: schema.DatabaseRevision) -> str:
    heads = ", ".join(state.heads)
    if not state.current:
        return f"database at {where} has no schema yet (head: {heads}): run 'stock-sync db upgrade'"
    current = ", ".join(state.current)
    if state.is_head:
        return f"database at {where} is at {current} (head)"
    return f"database at {where} is at {current}, not at the head {heads}"


@db.command("history")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def db_history(as_json: bool) -> None:
    """List the migrations, newest first, with their messages (reads no database)."""
    revisions = schema.history()
    emit(
        as_json,
        [revision.to_dict() for revision in revisions],
        lambda: render_history(revisions),
    )


def render_history(revisions: Sequence[schema.Revision]) -> str:
    return render.table(
        ("revision", "revises", "message"),
        [
            (
                f"{revision.revision}{' (head)' if revision.is_head else ''}",
                revision.down_revision or "-",
                revision.message,
            )
            for revision in revisions
        ],
    )


def _confirm_downgrade(url: str, revision: str) -> None:
    if not cli_common.stdin_is_interactive():
        fail("refusing to downgrade without confirmation: stdin is not a terminal (pass --yes)")
    question = (
        f"Downgrade the database at {redact_url(url)} to {one_line(revision)}? "
        "Tables of later revisions are dropped with their data"
    )
    if not click.confirm(question, default=False, err=True):
        fail("downgrade cancelled: nothing changed")


@cli.group(cls=StockSyncGroup)
def stock() -> None:
    """Stock levels."""


@stock.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("sku", type=PLAIN_TEXT)
@click.argument("quantity", type=QUANTITY)
@needs(database=True)
def stock_set(sku: str, quantity: int) -> None:
    """Set SKU's level to QUANTITY, 0 to 2147483647 (the change is recorded as a correction)."""
    with get_database().transaction() as session:
        change = set_stock(session, sku, quantity)
    click.echo(f"{change.sku}: {change.previous} -> {change.quantity}")


@stock.command("get")
@click.argument("sku", type=PLAIN_TEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@needs(database=True)
def stock_get(sku: str, as_json: bool) -> None:
    """Print SKU's level."""
    sku = validate_sku(sku)
    with get_database(read_only=True).transaction() as session:
        quantity = get_stock(session, sku)
    if quantity is None:
        fail(f"unknown SKU: {sku}")
    emit(as_json, {"sku": sku, "quantity": quantity}, lambda: f"{sku}: {quantity}")


# --- operations -----------------------------------------------------------------------


@cli.command("show")
@click.argument("operation_id", type=PLAIN_TEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@needs(database=True)
def show(operation_id: str, as_json: bool) -> None:
    """Print an operation, its line items and its timeline of events."""
    from stock_sync.producer import parse_operation_id

    with get_database(read_only=True).transaction() as session:
        details = operation_details(session, parse_operation_id(operation_id))
    emit(as_json, details, lambda: render.operation(details))


@cli.command("list")
@click.option(
    "--status",
    type=click.Choice([s.value for s in OperationStatus]),
    default=None,
    help="Only operations in this status.",
)
@click.option(
    "--order", "order_id", type=PLAIN_TEXT, default=None, help="Only this order's operations."
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@needs(database=True)
def list_command(status: str | None, order_id: str | None, limit: int, as_json: bool) -> None:
    """List operations, newest first (order deductions and adjustments alike)."""
    with get_database(read_only=True).transaction() as session:
        rows = list_operations(
            session,
            status=OperationStatus(status) if status else None,
            order_id=order_id,
            limit=limit,
        )
    emit(as_json, rows, lambda: render.operation_table(rows))


@cli.command("cancel")
@click.argument("operation_id", type=PLAIN_TEXT)
@click.option("--by", "cancelled_by", type=PLAIN_TEXT, required=True, help="Who cancels.")
@click.option("--reason", type=PLAIN_TEXT, required=True, help="Why (stored).")
@click.option("--wait", is_flag=True, help="Wait until the microservice rollback settles.")
@click.option(
    "--timeout",
    "timeout_s",
    type=FiniteFloatRange(0, 3600),
    default=60.0,
    show_default=True,
    help="Seconds --wait waits at most.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@needs(database=True, broker=True)
def cancel(
    operation_id: str, cancelled_by: str, reason: str, wait: bool, timeout_s: float, as_json: bool
) -> None:
    """Cancel an operation and roll back what it changed; prints the CancellationResult.

    With --wait, exits 4 when the microservice rollback is still pending or failed.
    """
    from stock_sync.producer import default_services, request_cancellation

    result = request_cancellation(operation_id, cancelled_by, reason)
    deadline = time.monotonic() + timeout_s
    while wait and result.microservice_rollback == "pending" and time.monotonic() < deadline:
        time.sleep(0.2)
        result = default_services().cancellation.result_of(result.operation_id)
    payload = result.to_dict()
    emit(as_json, payload, lambda: render.cancellation(payload))
    if wait and result.microservice_rollback in ("pending", "failed"):
        sys.exit(EXIT_ROLLBACK_UNSETTLED)


@cli.command("sweep")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@needs(database=True, broker=True)
def sweep(as_json: bool) -> None:
    """Re-drive stuck operations now (what the beat entry does)."""
    from stock_sync.composition import sweeper_for
    from stock_sync.producer import default_services

    report = sweeper_for(default_services()).sweep()
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
@click.option(
    "--marketplace",
    is_flag=True,
    help="Audit the marketplace instead: read the orders of the operations settled within "
    "--since and report those Allegro disagrees with.",
)
@click.option(
    "--since",
    "since_s",
    type=DURATION,
    default=None,
    help="With --marketplace: the window of settled operations (default 24h).",
)
@click.option("--repair", is_flag=True, help="With --marketplace: put the drift right.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def check(as_json: bool, marketplace: bool, since_s: float | None, repair: bool) -> None:
    """Reconcile stock levels, the ledger and the operations; with --marketplace, verify that
    the marketplace agrees with the operations settled lately (and --repair the drift through
    the pipeline's own sync and rollback).

    Exit status: 0 everything reconciles (or agrees, drift repaired included), 1 a mismatch or
    unrepaired drift was found, 2 the check could not run (database unreachable, bad
    configuration...).
    """
    if marketplace:
        _check_marketplace(since_s or DEFAULT_AUDIT_WINDOW_S, repair, as_json)
        return
    if since_s is not None or repair:
        raise click.UsageError("--since and --repair go with --marketplace")
    from stock_sync.services.reconciliation import reconcile_database

    try:
        report = reconcile_database(get_database(read_only=True))
    except Exception as error:  # whatever stopped it, it is "could not run", never "mismatch"
        fail(describe_failure(error), EXIT_CHECK_COULD_NOT_RUN)
    payload = report.to_dict()
    emit(as_json, payload, lambda: render.reconciliation(payload))
    if not report.ok:
        sys.exit(EXIT_CHECK_MISMATCH)


DEFAULT_AUDIT_WINDOW_S = 24 * 3600.0


def _check_marketplace(since_s: float, repair: bool, as_json: bool) -> None:
    from stock_sync.composition import audit_for
    from stock_sync.producer import default_services

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            click.echo(f"\rchecked {done}/{total} orders", nl=False, err=True)

    try:
        report = audit_for(default_services()).run(
            since_s=since_s, repair=repair, progress=progress
        )
    except Exception as error:  # whatever stopped it, it is "could not run", never "drift"
        fail(describe_failure(error), EXIT_CHECK_COULD_NOT_RUN)
    if sys.stderr.isatty():
        click.echo("", err=True)
    payload = report.to_dict()
    emit(as_json, payload, lambda: render.marketplace_audit(payload))
    if not report.agrees:
        sys.exit(EXIT_CHECK_MISMATCH)


# --- processes --------------------------------------------------------------------------


@cli.command("worker", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
@needs(database=True, broker=True)
def worker(ctx: click.Context) -> None:
    """Run a Celery worker (extra arguments go to 'celery worker')."""
    from tasks import app

    app.worker_main(["worker", "--loglevel", get_settings().log_level, *ctx.args])


cli.add_command(submit)
cli.add_command(stats)
cli.add_command(metrics_server)
cli.add_command(flower)
cli.add_command(rollback)
cli.add_command(retry)
cli.add_command(health)
cli.add_command(settings)


def main() -> None:
    try:
        cli(prog_name="stock-sync")
    finally:
        # SQLite removes its -wal and -shm files when the last connection closes: closed here,
        # not left to the garbage collection at exit, which does not promise to close them.
        reset_databases()

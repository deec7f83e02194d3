"""``stock-sync retry``: give FAILED operations successors that start where they stopped.

cli.py adds the command to ``stock-sync``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any
from uuid import UUID

import click

from stock_sync.domain.errors import RetryRefused
from stock_sync.domain.stages import PIPELINE
from stock_sync.entrypoints import cli_common, render
from stock_sync.entrypoints.cli_common import EXIT_ERROR, emit, fail, needs
from stock_sync.entrypoints.cli_params import DURATION, PLAIN_TEXT

if TYPE_CHECKING:  # the services are imported when the command runs, not when the CLI starts
    from stock_sync.services.recovery import OperationRecoveryService


# Which FAILED operations --failed takes (kept out of the command to keep it short to read).
EVERY_FAILED_OPTION = click.option(
    "--failed",
    "every_failed",
    is_flag=True,
    help="Every FAILED order deduction not retried yet (narrow with --since and --stage).",
)
SINCE_OPTION = click.option(
    "--since",
    "since_s",
    type=DURATION,
    default=None,
    help="With --failed: only those that failed within this long (90s, 15m, 2h, 7d).",
)
STAGE_OPTION = click.option(
    "--stage",
    type=click.Choice([stage.name for stage in PIPELINE]),
    default=None,
    help="With --failed: only those that failed in this stage.",
)


@click.command("retry")
@click.argument("operation_ids", nargs=-1, type=PLAIN_TEXT)
@EVERY_FAILED_OPTION
@SINCE_OPTION
@STAGE_OPTION
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (for scripts).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@needs(database=True, broker=True)
def retry(
    operation_ids: tuple[str, ...],
    every_failed: bool,
    since_s: float | None,
    stage: str | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Retry FAILED operations: each gets a successor operation for the same order that starts
    where it stopped (from the load; or, when it failed after deducting, it takes that
    deduction over and goes on to the sync). The failed operation stays FAILED; `show` and
    `list` link the two, and submitting the order again returns the successor.

    Give OPERATION_IDS, or --failed. Every id is checked before anything is written: an
    unknown one, one that is not FAILED or one retried already is refused (exit 1, nothing
    written). Asks for confirmation unless --yes is given; without --yes it refuses to run
    when stdin is not a terminal.
    """
    from stock_sync.producer import default_services

    if every_failed == bool(operation_ids):
        raise click.UsageError("give operation ids or --failed (one of the two)")
    if not every_failed and (since_s is not None or stage is not None):
        raise click.UsageError("--since and --stage go with --failed")
    recovery = default_services().recovery
    if every_failed:
        ids = recovery.failed_operations(since_s=since_s, stage=stage)
    else:
        ids = _checked_ids(recovery, operation_ids)
    if not ids:
        emit(as_json, {"retried": [], "refused": []}, lambda: "no failed operation to retry")
        return
    if not yes:
        _confirm(len(ids), cli_common.stdin_is_interactive())
    retried, refused = _retry_each(recovery, ids)
    payload = {"retried": retried, "refused": refused}
    emit(as_json, payload, lambda: render.retries(retried, refused))
    if refused and not every_failed:
        sys.exit(EXIT_ERROR)


def _checked_ids(recovery: OperationRecoveryService, operation_ids: tuple[str, ...]) -> list[UUID]:
    """The given ids, parsed, once each; every one checked retryable before any is retried."""
    from stock_sync.producer import parse_operation_id

    ids = list(dict.fromkeys(parse_operation_id(value) for value in operation_ids))
    for operation_id in ids:
        recovery.check_retryable(operation_id)  # one error line, nothing written
    return ids


def _retry_each(
    recovery: OperationRecoveryService, ids: list[UUID]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Retry every id in turn: the successors made, and the refusals (a concurrent retry)."""
    retried, refused = [], []
    for number, operation_id in enumerate(ids, start=1):
        _progress(number, len(ids))
        try:
            retried.append(recovery.retry_operation(operation_id).to_dict())
        except RetryRefused as error:  # a concurrent retry got there first
            refused.append(str(error))
    _progress_done(len(ids))
    return retried, refused


def _confirm(count: int, interactive: bool) -> None:
    if not interactive:
        fail("refusing to retry without confirmation: stdin is not a terminal (pass --yes)")
    question = f"Retry {count} failed operation(s) (each gets a successor)?"
    if not click.confirm(question, default=False, err=True):
        fail("retry cancelled: nothing changed")


def _progress(number: int, total: int) -> None:
    """A progress line on a terminal (stderr), for long runs of --failed."""
    if total > 1 and sys.stderr.isatty():
        click.echo(f"\rretrying {number}/{total}", nl=False, err=True)


def _progress_done(total: int) -> None:
    if total > 1 and sys.stderr.isatty():
        click.echo("", err=True)

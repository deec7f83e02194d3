"""``stock-sync rollback retry OP_ID``: an operator's way out of a failed microservice rollback.

cli.py adds the ``rollback`` group to the ``stock-sync`` command.
"""

from __future__ import annotations

import click

from stock_sync.entrypoints import render
from stock_sync.entrypoints.cli_common import StockSyncGroup, emit, needs
from stock_sync.entrypoints.cli_params import PLAIN_TEXT


@click.group("rollback", cls=StockSyncGroup)
def rollback() -> None:
    """Microservice rollbacks of cancelled operations."""


@rollback.command("retry")
@click.argument("operation_id", type=PLAIN_TEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@needs(database=True, broker=True)
def retry(operation_id: str, as_json: bool) -> None:
    """Run a FAILED microservice rollback again, as a new rollback adjustment.

    OPERATION_ID is the failed microservice_rollback adjustment, or the cancelled operation it
    belongs to. Refused when the operation's latest rollback is pending or completed. The new
    rollback puts back the fulfillment status recorded before the sync and is enqueued at once
    (follow it with `stock-sync show OPERATION_ID`).
    """
    from stock_sync.producer import default_services, parse_operation_id

    cancellation = default_services().cancellation
    result = cancellation.retry_microservice_rollback(parse_operation_id(operation_id))
    payload = result.to_dict()
    emit(as_json, payload, lambda: render.rollback_retry(payload))

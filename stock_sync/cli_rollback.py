"""``stock-sync rollback retry OP_ID``: an operator's way out of a failed microservice rollback.

The commands add themselves to the ``stock-sync`` group when cli.py imports this module (it
imports cli.py in turn, which is why cli.py does so at its end).
"""

from __future__ import annotations

import click

from stock_sync import render
from stock_sync.cli import cli, emit
from stock_sync.cli_params import PLAIN_TEXT


@cli.group("rollback")
def rollback() -> None:
    """Microservice rollbacks of cancelled operations."""


@rollback.command("retry")
@click.argument("operation_id", type=PLAIN_TEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def retry(operation_id: str, as_json: bool) -> None:
    """Run a FAILED microservice rollback again, as a new rollback adjustment.

    OPERATION_ID is the failed microservice_rollback adjustment, or the cancelled operation it
    belongs to. Refused when the operation's latest rollback is pending or completed. The new
    rollback puts back the fulfillment status recorded before the sync and is enqueued at once
    (follow it with `stock-sync show OPERATION_ID`).
    """
    from stock_sync.composition import get_services
    from stock_sync.producer import parse_operation_id

    result = get_services().cancellation.retry_microservice_rollback(
        parse_operation_id(operation_id)
    )
    payload = result.to_dict()
    emit(as_json, payload, lambda: render.rollback_retry(payload))

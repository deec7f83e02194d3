"""``stock-sync submit ORDER_ID`` and ``stock-sync submit --file FILE``: one order, or a batch
(the shop backend's imports and catch-ups) in one transaction and one broker connection.

cli.py adds the command to ``stock-sync``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import click

from stock_sync.domain.errors import BatchEnqueueFailed, EnqueueFailed, InvalidInput
from stock_sync.entrypoints.cli_common import EXIT_NOT_ENQUEUED, emit, needs, safe_message
from stock_sync.entrypoints.cli_params import PLAIN_TEXT

_JSON_KEYS = frozenset({"order_id", "account_name"})


@dataclass(frozen=True)
class OrderLine:
    """One order of a file, with the line it was read from (1-based)."""

    line: int
    order_id: str
    account_name: str | None


def _line_fields(text: str) -> tuple[object, object]:
    """(order_id, account_name) of a line: ``ORDER_ID [ACCOUNT]`` or a JSON object."""
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as error:
            raise InvalidInput(f"not valid JSON ({error})") from None
        if not isinstance(value, dict):
            raise InvalidInput("a JSON line must be an object")
        unknown = sorted(set(value) - _JSON_KEYS)
        if unknown:
            raise InvalidInput(f"unknown key {unknown[0]!r} (expected order_id, account_name)")
        if "order_id" not in value:
            raise InvalidInput("order_id is missing")
        return value["order_id"], value.get("account_name")
    order_id, _, account_name = text.partition(" ") if " " in text else text.partition("\t")
    return order_id, account_name.strip() or None


def read_orders(stream: IO[bytes], name: str) -> list[OrderLine]:
    """Every order of ``stream`` (blank lines skipped), checked as the submit checks them; a bad
    line is InvalidInput naming ``name`` and its line number."""
    from stock_sync.producer import checked_order

    orders = []
    for number, raw in enumerate(stream, start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            if not text:
                continue
            order_id, account_name = checked_order(*_line_fields(text))
        except UnicodeDecodeError:
            raise InvalidInput(f"{name}, line {number}: not UTF-8 text") from None
        except InvalidInput as error:
            raise InvalidInput(f"{name}, line {number}: {error}") from None
        orders.append(OrderLine(number, order_id, account_name))
    return orders


@contextlib.contextmanager
def _opened(path: str) -> Iterator[tuple[IO[bytes], str]]:
    if path == "-":
        yield sys.stdin.buffer, "stdin"
        return
    try:
        stream = open(path, "rb")  # noqa: SIM115  (closed below, after reading)
    except OSError as error:
        raise InvalidInput(f"cannot read {path}: {error.strerror or error}") from None
    with stream:
        yield stream, path


class _Progress:
    """One line on stderr, redrawn in place, when stderr is a terminal; nothing otherwise."""

    def __init__(self) -> None:
        self._shown = sys.stderr.isatty()
        self._drawn = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if not self._shown or (done < total and now - self._drawn < 0.2):
            return
        self._drawn = now
        text = f"saved {total:,} operations" if stage == "saved" else f"enqueued {done:,}/{total:,}"
        click.echo(f"\r{text}\033[K", err=True, nl=False)

    def clear(self) -> None:
        if self._shown:
            click.echo("\r\033[K", err=True, nl=False)


def _payload(
    orders: Iterable[OrderLine], ids: list[Any], created: list[Any], not_enqueued: list[Any]
) -> dict[str, Any]:
    new = set(created)
    return {
        "orders": [
            {
                "line": order.line,
                "order_id": order.order_id,
                "operation_id": str(operation_id),
                "created": operation_id in new,
            }
            for order, operation_id in zip(orders, ids, strict=True)
        ],
        "created": len(created),
        "not_enqueued": [str(operation_id) for operation_id in not_enqueued],
    }


def submit_file(path: str, as_json: bool) -> None:
    """Submit every order of ``path`` as one batch; exit 3 when some were not enqueued."""
    from stock_sync.producer import submit_operations

    with _opened(path) as (stream, name):
        orders = read_orders(stream, name)
    progress = _Progress()
    started = time.monotonic()
    not_enqueued: list[Any] = []
    try:
        submission = submit_operations(
            [(order.order_id, order.account_name) for order in orders], on_progress=progress
        )
        ids, created = submission.operation_ids, submission.created
    except BatchEnqueueFailed as error:
        ids, created, not_enqueued = error.operation_ids, error.created, error.not_enqueued
        warning = safe_message(str(error))
    finally:
        progress.clear()
    payload = _payload(orders, ids, created, not_enqueued)
    emit(as_json, payload, lambda: "\n".join(str(operation_id) for operation_id in ids))
    if not as_json:
        seconds = time.monotonic() - started
        click.echo(
            f"submitted {len(orders):,} orders in {seconds:.1f} s: {len(created):,} new "
            f"operations, {len(set(ids)) - len(created):,} submitted before",
            err=True,
        )
    if not_enqueued:
        click.echo(f"warning: {warning}", err=True)
        sys.exit(EXIT_NOT_ENQUEUED)


@click.command("submit")
@click.argument("order_id", type=PLAIN_TEXT, required=False)
@click.option(
    "--account", "account_name", type=PLAIN_TEXT, default=None, help="Allegro account name."
)
@click.option(
    "--file",
    "path",
    type=PLAIN_TEXT,
    default=None,
    help="Submit every order of this file ('-': stdin) as one batch.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with --file).")
@needs(database=True, broker=True)
def submit(order_id: str | None, account_name: str | None, path: str | None, as_json: bool) -> None:
    """Record ORDER_ID's stock operation and enqueue it; prints the operation id alone.

    With --file, every order of FILE in one transaction, enqueued over one broker connection:
    one order a line, 'ORDER_ID [ACCOUNT]' or a JSON object {"order_id": ..., "account_name":
    ...}; blank lines are skipped. Each order gets what submitting it alone would give it (an
    order submitted before keeps its operation, one listed twice gets one). A bad line refuses
    the whole file, naming its line, and nothing is written. Prints each line's operation id,
    in order (--json: line, order_id, operation_id, created), with a summary on stderr.

    Exits 3 when operations were saved but could not be enqueued (the sweep re-drives them).
    """
    if (order_id is None) == (path is None):
        raise click.UsageError("give either ORDER_ID or --file FILE")
    if path is not None:
        if account_name is not None:
            raise click.UsageError(
                "--account goes with ORDER_ID (in --file each line names its own)"
            )
        submit_file(path, as_json)
        return
    if as_json:
        raise click.UsageError("--json goes with --file")
    submit_one(str(order_id), account_name)


def submit_one(order_id: str, account_name: str | None) -> None:
    from stock_sync.producer import submit_operation

    try:
        operation_id = submit_operation(order_id, account_name)
    except EnqueueFailed as error:
        click.echo(str(error.operation_id))
        click.echo(f"warning: {safe_message(str(error))}", err=True)
        sys.exit(EXIT_NOT_ENQUEUED)
    click.echo(str(operation_id))

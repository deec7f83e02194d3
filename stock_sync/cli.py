"""The ``stock-sync`` command line: human output by default, ``--json`` where asked."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from stock_sync import schema
from stock_sync.db import get_database
from stock_sync.domain.errors import StockSyncError
from stock_sync.settings import get_settings
from stock_sync.stock_ledger import get_stock, set_stock, validate_sku


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


def main() -> None:
    cli(prog_name="stock-sync")

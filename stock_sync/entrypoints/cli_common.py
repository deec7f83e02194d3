"""What every ``stock-sync`` command shares: exit codes, the one-line error, the output.

The command modules (cli.py and the cli_* modules it gathers) import this one and never each
other, so the command line has no import cycle.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click
from alembic.util import CommandError as MigrationError
from sqlalchemy.exc import SQLAlchemyError

from stock_sync.adapters.db import describe_database_error
from stock_sync.adapters.redaction import one_line, printable_lines, redact, redact_data
from stock_sync.adapters.settings import get_settings
from stock_sync.domain.errors import ConfigurationError, StockSyncError

EXIT_ERROR = 1
EXIT_USAGE = 2  # click's usage errors, and an unknown STOCK_SYNC_* variable
EXIT_NOT_ENQUEUED = 3  # saved as PENDING, not enqueued: the sweep will re-drive it
EXIT_ROLLBACK_UNSETTLED = 4  # cancelled, but the microservice rollback is pending or failed
EXIT_CHECK_MISMATCH = 1
EXIT_CHECK_COULD_NOT_RUN = 2
EXIT_INTERRUPTED = 130


def safe_message(message: str) -> str:
    """What may be printed: passwords and tokens masked, one line."""
    return one_line(redact(message))


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print a one-line error and exit non-zero; never a traceback."""
    click.echo(f"error: {safe_message(message)}", err=True)
    sys.exit(code)


def _configured_database_url() -> str:
    try:
        return get_settings().effective_database_url
    except ConfigurationError:
        return "<the configured database>"


Command = TypeVar("Command", bound=Callable[..., Any])


def needs(*, database: bool = False, broker: bool = False) -> Callable[[Command], Command]:
    """The servers a command works with: without their URLs (and outside the embedded set-up)
    it refuses at once, one ``error:`` line naming the variables, exit 1, before it reads,
    writes or imports anything for them."""

    def decorate(command: Command) -> Command:
        @functools.wraps(command)
        def checked(*args: Any, **kwargs: Any) -> Any:
            try:
                get_settings().require_servers(database=database, broker=broker)
            except ConfigurationError as error:
                fail(str(error))
            return command(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return decorate


def describe_failure(error: BaseException) -> str:
    """The one line an operator reads for ``error``."""
    if isinstance(error, SQLAlchemyError):
        return describe_database_error(error, _configured_database_url())
    if isinstance(error, MigrationError):
        return f"migration refused: {error}"
    if isinstance(error, StockSyncError):
        return str(error)
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return f"unexpected {type(error).__name__}: {error}"


# Failures a command may end with; each becomes one line and exit 1.
EXPECTED_FAILURES = (StockSyncError, SQLAlchemyError, MigrationError)


class StockSyncGroup(click.Group):
    """Turns our errors into one-line messages with a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EXPECTED_FAILURES as error:
            fail(describe_failure(error))


def stdin_is_interactive() -> bool:
    """Whether a person can answer a prompt (a terminal on stdin)."""
    return sys.stdin is not None and sys.stdin.isatty()


def emit(as_json: bool, payload: Any, human: Callable[[], str]) -> None:
    """Print ``payload`` as JSON, or the human rendering. Stored text (an error a service
    recorded, a reason an operator typed) is redacted, and escaped for the terminal."""
    if as_json:
        click.echo(json.dumps(redact_data(payload), indent=2, default=str))
    else:
        click.echo(printable_lines(human()))

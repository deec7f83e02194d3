"""What the development tools' command lines share: argument types, the admin connection
option, and SIGTERM unwinding like Ctrl-C."""

from __future__ import annotations

import argparse
import dataclasses
import os
from types import FrameType
from typing import Any, TypeVar

from stock_sync_dev.bench.harness import DEFAULT_ADMIN_URL

T = TypeVar("T")
ADMIN_URL_HELP = "an admin connection allowed to CREATE/DROP DATABASE"


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def not_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def positive_seconds(value: str) -> float:
    number = float(value)
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value}")
    return number


def suite_parser(
    prog: str, description: str, default_orders: int, default_seed: int
) -> argparse.ArgumentParser:
    """A fault suite's command line, with the ``--orders``, ``--seed`` and ``--json`` every
    suite has."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--orders", type=positive_int, default=default_orders)
    parser.add_argument("--seed", type=int, default=default_seed)
    parser.add_argument(
        "--json",
        dest="json_output",
        action="store_true",
        help="print the report as JSON on stdout",
    )
    return parser


def add_postgres_url(parser: argparse.ArgumentParser, help: str | None = ADMIN_URL_HELP) -> None:
    """``--postgres-url``: the admin connection the tool makes its throwaway database with
    (default STOCK_SYNC_TEST_POSTGRES_URL, else the local server)."""
    parser.add_argument(
        "--postgres-url",
        dest="admin_url",
        metavar="POSTGRES_URL",
        default=os.environ.get("STOCK_SYNC_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL),
        help=help,
    )


def options_of(options_type: type[T], args: argparse.Namespace, **worked_out: Any) -> T:
    """An ``options_type`` dataclass: each field from the parsed argument of its name (the
    parser's ``dest``), unless ``worked_out`` from several arguments."""
    given = {
        option.name: getattr(args, option.name)
        for option in dataclasses.fields(options_type)  # type: ignore[arg-type]
        if hasattr(args, option.name)
    }
    return options_type(**{**given, **worked_out})


def interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so everything started is stopped or removed

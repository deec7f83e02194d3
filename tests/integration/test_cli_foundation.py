"""The stock-sync CLI as an operator runs it: a real process, real PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from stock_sync.adapters.db import Database

CLI = [str(Path(sys.executable).with_name("stock-sync"))]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60
    )


def test_stock_set_then_get_as_json(clean_database: Database) -> None:
    assert run("stock", "set", "SKU-9", "7").returncode == 0
    result = run("stock", "get", "SKU-9", "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"sku": "SKU-9", "quantity": 7}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("stock", "set", "SKU-9", "-3"), "quantity must be >= 0"),
        (("stock", "set", "", "3"), "SKU must not be empty"),
        (("stock", "get", "NEVER-STOCKED"), "unknown SKU: NEVER-STOCKED"),
    ],
)
def test_bad_arguments_give_one_line_and_a_non_zero_exit(
    clean_database: Database, args: tuple[str, ...], message: str
) -> None:
    result = run(*args)
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: {message}" or message in result.stderr.strip()
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_an_unreachable_database_is_one_line() -> None:
    result = run(
        "stock",
        "get",
        "A",
        env={"STOCK_SYNC_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"},
    )
    assert result.returncode != 0
    assert result.stderr.startswith(
        "error: cannot reach the database at postgresql://postgres@127.0.0.1:1/none"
    )
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_malformed_setting_is_refused_naming_it() -> None:
    result = run("stock", "get", "A", env={"STOCK_SYNC_MAX_RETRIES_PENDING": "many"})
    assert result.returncode != 0
    assert "STOCK_SYNC_MAX_RETRIES_PENDING" in result.stderr and "Traceback" not in result.stderr


def test_db_upgrade_creates_the_schema_on_an_empty_database(
    make_throwaway_database: object, tmp_path: Path
) -> None:
    url: str = make_throwaway_database()  # type: ignore[operator]
    result = run("db", "upgrade", env={"STOCK_SYNC_DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert run("stock", "set", "A", "1", env={"STOCK_SYNC_DATABASE_URL": url}).returncode == 0


def test_a_database_without_schema_says_to_upgrade(make_throwaway_database: object) -> None:
    url: str = make_throwaway_database()  # type: ignore[operator]
    result = run("stock", "get", "A", env={"STOCK_SYNC_DATABASE_URL": url})
    assert result.returncode != 0
    assert "run 'stock-sync db upgrade'" in result.stderr


def test_version_prints_the_installed_distributions_version_and_exits_0() -> None:
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"stock-sync {version('stock-sync')}\n"
    assert result.stderr == ""

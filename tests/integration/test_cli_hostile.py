"""The CLI against hostile input: every refusal is one ``error:`` line on stderr and a non-zero
exit, never a traceback, never a password, and nothing is written. The cases from the field run
as an operator runs them (a real process, ``run``); their neighbours in this process (``invoke``,
click's CliRunner), which is much faster. All on the embedded SQLite set-up
(STOCK_SYNC_EMBEDDED=1) in a throwaway data folder unless they say otherwise."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from stock_sync.adapters import schema
from stock_sync.adapters.db import Database
from stock_sync.adapters.settings import get_settings
from stock_sync.adapters.stock_ledger import set_stock
from stock_sync.composition import reset_services
from stock_sync.entrypoints import cli_common
from stock_sync.entrypoints.cli import cli
from tests.support import insert_operation

CLI = str(Path(sys.executable).with_name("stock-sync"))
SECRET = "S3CRETPW"


def clean_environment(data_dir: Path, **variables: str) -> dict[str, str]:
    """This process's environment without its STOCK_SYNC_* settings (the test session points
    them at PostgreSQL), on the embedded set-up in ``data_dir``, plus ``variables``."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("STOCK_SYNC_")}
    embedded = {"STOCK_SYNC_EMBEDDED": "1", "STOCK_SYNC_DATA_DIR": str(data_dir)}
    return {**kept, **embedded, **variables}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def run(data_dir: Path, *args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        env=clean_environment(data_dir, **variables),
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def invoke(data_dir: Path, *args: str, input: str | None = None, **variables: str) -> Result:
    """The CLI in this process, under the same environment ``run`` would give it."""
    environment: dict[str, str | None] = {
        name: None for name in os.environ if name.startswith("STOCK_SYNC_")
    }
    environment.update(STOCK_SYNC_EMBEDDED="1", STOCK_SYNC_DATA_DIR=str(data_dir), **variables)
    get_settings.cache_clear()
    reset_services()
    try:
        return CliRunner().invoke(cli, list(args), env=environment, input=input)
    finally:
        get_settings.cache_clear()
        reset_services()


def assert_one_error_line(result: subprocess.CompletedProcess[str] | Result, code: int = 1) -> str:
    """The refusal: exit ``code``, one ``error:`` line on stderr, no traceback, no secret."""
    exit_code = (
        result.returncode if isinstance(result, subprocess.CompletedProcess) else (result.exit_code)
    )
    assert exit_code == code, (exit_code, result.stderr)
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert SECRET not in result.stderr + result.stdout
    assert not result.stderr.startswith("error: unexpected"), "the last guard caught it"
    return result.stderr.strip()


@pytest.fixture
def migrated(data_dir: Path) -> Iterator[Path]:
    """The embedded database in ``data_dir``, migrated, with SKU-1 at 5."""
    database = Database(f"sqlite:///{data_dir / 'stock_sync.sqlite3'}")
    schema.upgrade(database.url)
    with database.transaction() as session:
        set_stock(session, "SKU-1", 5)
    yield data_dir
    database.dispose()


def stock_of(data_dir: Path, sku: str) -> object:
    return json.loads(invoke(data_dir, "stock", "get", sku, "--json").stdout)["quantity"]


# --- 1. quantities ------------------------------------------------------------------------------


@pytest.mark.parametrize("quantity", ["9223372036854775808", "100000000000000000000"])
def test_the_quantities_from_the_field_are_refused_and_change_nothing(
    migrated: Path, quantity: str
) -> None:
    message = assert_one_error_line(run(migrated, "stock", "set", "SKU-1", quantity), code=2)
    assert f"quantity must be <= 2147483647, got '{quantity}'" in message
    assert stock_of(migrated, "SKU-1") == 5


@pytest.mark.parametrize(
    ("quantity", "reason"),
    [
        ("2147483648", "quantity must be <= 2147483647"),
        ("-3", "quantity must be >= 0"),
        ("1e3", "quantity must be a whole number"),
        ("5.0", "quantity must be a whole number"),
        ("9" * 5000, "quantity must be <= 2147483647"),
    ],
)
def test_a_quantity_out_of_bounds_is_refused_and_changes_nothing(
    migrated: Path, quantity: str, reason: str
) -> None:
    message = assert_one_error_line(invoke(migrated, "stock", "set", "SKU-1", quantity), code=2)
    assert reason in message
    assert stock_of(migrated, "SKU-1") == 5


def test_the_largest_quantity_is_stored_as_an_integer(migrated: Path) -> None:
    assert invoke(migrated, "stock", "set", "SKU-1", "2147483647").exit_code == 0
    assert stock_of(migrated, "SKU-1") == 2147483647


@pytest.mark.parametrize("sku", ["A\nB", "A\x1b[2JB", "A\u2028B", "A\udcffB"])
def test_a_sku_with_control_characters_is_refused(migrated: Path, sku: str) -> None:
    message = assert_one_error_line(invoke(migrated, "stock", "set", sku, "1"), code=2)
    assert "must not contain control characters" in message


# --- 3. never a traceback -----------------------------------------------------------------------


def test_an_unknown_migration_revision_is_one_line(data_dir: Path) -> None:
    message = assert_one_error_line(run(data_dir, "db", "upgrade", "--revision", "bogus"))
    assert message == "error: migration refused: Can't locate revision identified by 'bogus'"


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_the_metrics_server_on_a_taken_port_is_one_line(migrated: Path, taken_port: int) -> None:
    result = run(migrated, "metrics-server", "--port", str(taken_port))
    message = assert_one_error_line(result)
    assert message == f"error: cannot listen on 127.0.0.1:{taken_port}: Address already in use"


def test_the_metrics_server_on_a_bad_host_is_one_line(migrated: Path) -> None:
    message = assert_one_error_line(run(migrated, "metrics-server", "--host", "nohost.invalid"))
    assert message.startswith("error: cannot listen on nohost.invalid:9808: ")


@pytest.mark.parametrize("host", ["300.1.1.1", "::1::", "h\u00e9st", "[::1]"])
def test_the_metrics_server_on_other_bad_hosts_is_one_line(migrated: Path, host: str) -> None:
    message = assert_one_error_line(invoke(migrated, "metrics-server", "--host", host))
    assert message.startswith("error: ")


def test_a_data_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    message = assert_one_error_line(run(afile, "stock", "set", "A", "1"))
    assert message == f"error: STOCK_SYNC_DATA_DIR: {afile} is a file, not a folder"


@pytest.mark.parametrize(
    "command", [("db", "upgrade"), ("sweep",), ("stock", "set", "A", "1")], ids=" ".join
)
def test_a_data_dir_that_is_a_file_is_one_line_for_every_command_that_writes(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    message = assert_one_error_line(invoke(afile, *command))
    assert message == f"error: STOCK_SYNC_DATA_DIR: {afile} is a file, not a folder"


@pytest.mark.parametrize(("command", "code"), [(("check",), 2), (("list",), 1)], ids=str)
def test_a_command_that_only_reads_finds_no_database_in_a_data_dir_that_is_a_file(
    tmp_path: Path, command: tuple[str, ...], code: int
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    message = assert_one_error_line(invoke(afile, *command), code=code)
    assert message == (
        f"error: no database at {afile / 'stock_sync.sqlite3'} (a command that only reads"
        " creates none): run 'stock-sync db upgrade'"
    )


def test_a_data_dir_that_cannot_be_created_is_one_line() -> None:
    message = assert_one_error_line(invoke(Path("/proc/stock-sync-data"), "stock", "set", "A", "1"))
    assert message.startswith("error: STOCK_SYNC_DATA_DIR: cannot create the folder")


def test_an_unsupported_database_says_which_are_supported(data_dir: Path) -> None:
    result = run(data_dir, "stock", "get", "A", STOCK_SYNC_DATABASE_URL=f"mysql://u:{SECRET}@h/d")
    message = assert_one_error_line(result)
    assert "STOCK_SYNC_DATABASE_URL: unsupported database 'mysql'" in message
    assert "(supported: postgresql, sqlite)" in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STOCK_SYNC_DATABASE_URL", f"postgresql://u:{SECRET}@db-host:xx/stock"),
        ("STOCK_SYNC_MICROSERVICE_URL", f"allegro://svc:{SECRET}@wrapper:8080"),
        ("STOCK_SYNC_ALERT_WEBHOOK_URL", f"https://hooks.example.com/T0/{SECRET} x"),
    ],
)
def test_a_malformed_url_is_named_without_its_secret(
    data_dir: Path, variable: str, value: str
) -> None:
    message = assert_one_error_line(invoke(data_dir, "stock", "get", "A", **{variable: value}))
    assert f"invalid configuration: {variable}: " in message


def test_an_unreachable_database_is_one_line_without_the_password(data_dir: Path) -> None:
    url = f"postgresql://stock:{SECRET}@127.0.0.1:1/none"
    message = assert_one_error_line(invoke(data_dir, "list", STOCK_SYNC_DATABASE_URL=url))
    assert message.startswith("error: cannot reach the database at postgresql://stock:***@")


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("bogus",), "No such command 'bogus'"),
        (("stock", "set"), "Missing argument 'SKU'"),
        (("list", "--status", "lost"), "Invalid value for '--status'"),
        (("cancel", "x", "--by", "y", "--reason", "z", "--timeout", "nan"), "finite"),
        (("fake-microservice", "--latency", "inf"), "finite"),
    ],
)
def test_a_usage_error_is_one_line_with_exit_2(
    data_dir: Path, args: tuple[str, ...], reason: str
) -> None:
    assert reason in assert_one_error_line(invoke(data_dir, *args), code=2)


# --- 4. downgrade -------------------------------------------------------------------------------


def tables(data_dir: Path) -> set[str]:
    with sqlite3.connect(data_dir / "stock_sync.sqlite3") as connection:
        rows = connection.execute("select name from sqlite_master where type = 'table'")
        return {name for (name,) in rows} - {"alembic_version"}


def test_downgrade_needs_an_explicit_revision(migrated: Path) -> None:
    message = assert_one_error_line(invoke(migrated, "db", "downgrade"), code=2)
    assert "Missing argument 'REVISION'" in message
    assert "stock_levels" in tables(migrated)


def test_downgrade_without_a_terminal_and_without_yes_is_refused(migrated: Path) -> None:
    message = assert_one_error_line(run(migrated, "db", "downgrade", "base"))
    assert "stdin is not a terminal (pass --yes)" in message
    assert "stock_levels" in tables(migrated)


def test_downgrade_with_yes_drops_the_tables(migrated: Path) -> None:
    result = invoke(migrated, "db", "downgrade", "base", "--yes")
    assert result.exit_code == 0, result.stderr
    assert "stock_levels" not in tables(migrated)


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """stdin claims to be a terminal (CliRunner's is not)."""
    monkeypatch.setattr(cli_common, "stdin_is_interactive", lambda: True)


@pytest.mark.usefixtures("terminal")
def test_downgrade_asks_and_a_no_changes_nothing(migrated: Path) -> None:
    result = invoke(migrated, "db", "downgrade", "base", input="n\n")
    assert result.exit_code == 1
    assert "Tables of later revisions are dropped with their data" in result.stderr
    assert result.stderr.strip().endswith("error: downgrade cancelled: nothing changed")
    assert "stock_levels" in tables(migrated)


@pytest.mark.usefixtures("terminal")
def test_downgrade_asks_and_a_yes_downgrades(migrated: Path) -> None:
    result = invoke(migrated, "db", "downgrade", "base", input="y\n")
    assert result.exit_code == 0, result.stderr
    assert "stock_levels" not in tables(migrated)


# --- 5. check -----------------------------------------------------------------------------------


def test_check_exits_0_when_everything_reconciles(migrated: Path) -> None:
    result = invoke(migrated, "check")
    assert result.exit_code == 0 and "everything reconciles" in result.stdout


def test_check_exits_1_on_a_mismatch(migrated: Path) -> None:
    with sqlite3.connect(migrated / "stock_sync.sqlite3") as connection:
        connection.execute("update stock_levels set quantity = 99 where sku = 'SKU-1'")
    result = run(migrated, "check")
    assert result.returncode == 1 and "mismatch" in result.stdout and result.stderr == ""


def test_check_exits_2_when_it_cannot_run(data_dir: Path) -> None:
    url = f"postgresql://stock:{SECRET}@127.0.0.1:1/none"
    message = assert_one_error_line(run(data_dir, "check", STOCK_SYNC_DATABASE_URL=url), code=2)
    assert "cannot reach the database" in message


def test_check_exits_2_without_a_schema(data_dir: Path) -> None:
    message = assert_one_error_line(invoke(data_dir, "check"), code=2)
    assert "run 'stock-sync db upgrade'" in message


def test_checks_help_documents_its_exit_codes(data_dir: Path) -> None:
    text = " ".join(invoke(data_dir, "check", "--help").stdout.split())
    assert "0 everything reconciles (or agrees, drift repaired included), 1 a mismatch or" in text
    assert "unrepaired drift was found, 2 the check could not run" in text


# --- stored text on its way out -----------------------------------------------------------------


def test_stored_text_is_shown_redacted_and_without_terminal_escapes(migrated: Path) -> None:
    database = Database(f"sqlite:///{migrated / 'stock_sync.sqlite3'}")
    operation_id = insert_operation(
        database,
        account_name="shop\x1b]0;owned\x07",
        last_error=f"GET http://svc:{SECRET}@allegro/v1/orders/x failed\r\x1b[2Jall is fine",
        last_error_type="MicroserviceUnavailable",
    )
    database.dispose()

    for args in (("show", str(operation_id)), ("show", str(operation_id), "--json"), ("list",)):
        result = invoke(migrated, *args)
        assert result.exit_code == 0, result.stderr
        assert SECRET not in result.stdout
        assert "\x1b" not in result.stdout and "\r" not in result.stdout
    assert "svc:***@allegro" in invoke(migrated, "show", str(operation_id)).stdout

"""Production fails closed: no process runs on the embedded set-up unless asked for, an unknown
STOCK_SYNC_* variable is refused, and the commands that only read write nothing.

Real processes (``celery -A tasks worker|beat``, ``stock-sync ...``), each in a working folder
of its own so that the default data folder (``./data``) would show up there.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import DBAPIError

from stock_sync.adapters import schema
from stock_sync.adapters.db import Database
from stock_sync.adapters.settings import check_variables
from stock_sync.domain.errors import UnknownSetting
from tests.conftest import REDIS_URL

BIN = Path(sys.executable).parent
CLI = str(BIN / "stock-sync")
CELERY = str(BIN / "celery")
NO_DATABASE = (
    "error: no database configured: set STOCK_SYNC_DATABASE_URL (PostgreSQL), or"
    " STOCK_SYNC_EMBEDDED=1 (stock-sync --embedded) for the embedded demo set-up under"
    " STOCK_SYNC_DATA_DIR\n"
)
NO_BROKER = (
    "error: no broker configured: set STOCK_SYNC_BROKER_URL (Redis or RabbitMQ), or"
    " STOCK_SYNC_EMBEDDED=1 (stock-sync --embedded) for the embedded demo set-up under"
    " STOCK_SYNC_DATA_DIR\n"
)
NO_SERVERS = (
    "error: no database and no broker configured: set STOCK_SYNC_DATABASE_URL (PostgreSQL) and"
    " STOCK_SYNC_BROKER_URL (Redis or RabbitMQ), or STOCK_SYNC_EMBEDDED=1 (stock-sync"
    " --embedded) for the embedded demo set-up under STOCK_SYNC_DATA_DIR\n"
)
# Commands that only read: they must create and write nothing.
READ_ONLY = (
    ("list",),
    ("show", "5f0c6f7e-3d1a-4b8e-9c2d-7a6b5e4d3c2b"),  # no such operation; fixed: xdist collects
    ("stats",),
    ("check",),
    ("stock", "get", "SKU-1"),
    ("db", "current"),
    ("db", "history"),
    ("health",),
)


def run(folder: Path, command: list[str], **variables: str) -> subprocess.CompletedProcess[str]:
    """``command`` in ``folder`` with no STOCK_SYNC_* setting but ``variables``; a process that
    would start anyway (a worker finding its settings good) is cut short by the timeout."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("STOCK_SYNC_")}
    return subprocess.run(
        command,
        cwd=folder,
        env={**environment, **variables},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def named(command: list[str]) -> str:
    return " ".join(Path(part).name for part in command)


# --- no URL, no embedded set-up: refused ------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "variables", "refusal"),
    [
        ([CELERY, "-A", "tasks", "worker"], {}, NO_BROKER),
        ([CELERY, "-A", "tasks", "worker"], {"STOCK_SYNC_BROKER_URL": REDIS_URL}, NO_DATABASE),
        ([CELERY, "-A", "tasks", "beat"], {"STOCK_SYNC_BROKER_URL": REDIS_URL}, NO_DATABASE),
        ([CLI, "worker"], {}, NO_SERVERS),
        ([CLI, "metrics-server", "--port", "0"], {}, NO_SERVERS),
        ([CLI, "metrics-server"], {"STOCK_SYNC_BROKER_URL": REDIS_URL}, NO_DATABASE),
        ([CLI, "submit", "order-1"], {}, NO_SERVERS),
        ([CLI, "stock", "set", "SKU-1", "3"], {}, NO_DATABASE),
        ([CLI, "db", "upgrade"], {}, NO_DATABASE),
        ([CLI, "list"], {}, NO_DATABASE),
        ([CLI, "health"], {"STOCK_SYNC_DATABASE_URL": "sqlite:///x.sqlite3"}, NO_BROKER),
        ([CLI, "flower", "--local-only"], {}, NO_BROKER),
    ],
    ids=lambda value: (
        " ".join(Path(part).name for part in value) if isinstance(value, list) else ""
    ),
)
def test_a_process_without_its_urls_refuses_to_start_naming_them(
    tmp_path: Path, command: list[str], variables: dict[str, str], refusal: str
) -> None:
    result = run(tmp_path, command, **variables)

    assert (result.returncode, result.stderr) == (1, refusal), result.stdout
    assert list(tmp_path.iterdir()) == []  # no ./data, no SQLite file, no schedule


def test_check_refuses_with_its_could_not_run_code(tmp_path: Path) -> None:
    result = run(tmp_path, [CLI, "check"])

    assert (result.returncode, result.stderr) == (2, NO_DATABASE)


def test_a_command_that_needs_no_server_runs_without_urls(tmp_path: Path) -> None:
    result = run(tmp_path, [CLI, "db", "history"])

    assert result.returncode == 0 and "(head)" in result.stdout
    assert list(tmp_path.iterdir()) == []


# --- asked for: the embedded set-up -----------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "variables"),
    [
        ([CLI, "--embedded", "db", "upgrade"], {}),
        ([CLI, "db", "upgrade"], {"STOCK_SYNC_EMBEDDED": "1"}),
    ],
    ids=["--embedded", "STOCK_SYNC_EMBEDDED=1"],
)
def test_the_embedded_set_up_runs_when_asked_for(
    tmp_path: Path, command: list[str], variables: dict[str, str]
) -> None:
    result = run(tmp_path, command, **variables)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "stock_sync.sqlite3").is_file()


def test_an_embedded_worker_starts_and_says_so(tmp_path: Path) -> None:
    from tests import celery_processes

    environment = {k: v for k, v in os.environ.items() if not k.startswith("STOCK_SYNC_")}
    environment.update(STOCK_SYNC_EMBEDDED="1", STOCK_SYNC_DATA_DIR=str(tmp_path / "data"))
    with celery_processes.stopped_at_exit() as started:
        started.append(celery_processes.worker(environment, tmp_path / "worker.log"))
        log = started[0].log()

    assert '"action": "embedded_default"' in log
    assert (tmp_path / "data" / "broker" / "queue").is_dir()  # the worker made its folders


# --- unknown variables ----------------------------------------------------------------------


UNKNOWN = (
    "error: unknown setting STOCK_SYNC_MAX_RETRIES_PENDNG"
    " (did you mean STOCK_SYNC_MAX_RETRIES_PENDING?)\n"
)


@pytest.mark.parametrize(
    "command",
    [
        [CLI, "--embedded", "list"],
        [CLI, "db", "history"],
        [CELERY, "-A", "tasks", "worker"],
        [CELERY, "-A", "tasks", "beat"],
    ],
    ids=lambda command: named(command),
)
def test_an_unknown_setting_is_refused_at_start_naming_the_closest_one(
    tmp_path: Path, command: list[str]
) -> None:
    result = run(
        tmp_path,
        command,
        STOCK_SYNC_MAX_RETRIES_PENDNG="3",
        STOCK_SYNC_EMBEDDED="1",
        STOCK_SYNC_DATA_DIR=str(tmp_path / "data"),
    )

    assert (result.returncode, result.stderr) == (2, UNKNOWN), result.stdout
    assert not (tmp_path / "data").exists()


def test_a_name_far_from_every_setting_points_at_the_configuration_table() -> None:
    with pytest.raises(UnknownSetting) as raised:
        check_variables({"STOCK_SYNC_ZZZZZZZZZZ": "1", "STOCK_SYNC_QQQQQQQQQQ": "2"})
    assert str(raised.value) == (
        "unknown setting STOCK_SYNC_QQQQQQQQQQ (see the README's Configuration table);"
        " 1 more unknown"
    )


def test_a_lower_case_setting_is_checked_too_as_the_settings_read_it() -> None:
    with pytest.raises(UnknownSetting, match="did you mean STOCK_SYNC_LOG_LEVEL"):
        check_variables({"stock_sync_log_levl": "INFO"})


def test_the_test_suites_and_the_tools_variables_are_not_refused() -> None:
    check_variables(
        {
            "STOCK_SYNC_TEST_POSTGRES_URL": "postgresql://postgres@localhost/postgres",
            "STOCK_SYNC_TEST_REDIS_URL": REDIS_URL,
            "STOCK_SYNC_TEST_BROKER": "redis",
            "STOCK_SYNC_TEST_RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:5672",
            "STOCK_SYNC_TEST_SOMETHING_NEW": "1",
            "STOCK_SYNC_COUNT_SQL_DIR": "/tmp/counts",
            "STOCK_SYNC_IMAGE_TAG": "local",
            "STOCK_SYNC_LOG_LEVEL": "INFO",
            "OTHER": "x",
        }
    )


# --- commands that only read write nothing ------------------------------------------------------


@pytest.mark.parametrize("command", READ_ONLY, ids=" ".join)
def test_a_read_only_command_on_an_empty_folder_creates_nothing(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    result = run(tmp_path, [CLI, "--embedded", *command])

    if command != ("db", "history"):
        assert result.returncode != 0
        assert "no database" in result.stdout + result.stderr, result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []  # no ./data, no SQLite file


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and its content's digest."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_read_only_commands_leave_the_embedded_database_byte_for_byte(tmp_path: Path) -> None:
    assert run(tmp_path, [CLI, "--embedded", "db", "upgrade"]).returncode == 0
    assert run(tmp_path, [CLI, "--embedded", "stock", "set", "SKU-1", "4"]).returncode == 0
    before = fingerprint(tmp_path)
    assert list(before) == ["data/stock_sync.sqlite3"]

    for command in READ_ONLY:
        result = run(tmp_path, [CLI, "--embedded", *command])
        assert "Traceback" not in result.stderr, (command, result.stderr)

    assert fingerprint(tmp_path) == before  # no broker folder, no -wal or -shm left behind


def test_db_current_on_an_empty_postgresql_database_creates_no_version_table(
    make_throwaway_database: object, tmp_path: Path
) -> None:
    url: str = make_throwaway_database()  # type: ignore[operator]

    result = run(tmp_path, [CLI, "db", "current"], STOCK_SYNC_DATABASE_URL=url)

    assert result.returncode == 0 and "has no schema yet" in result.stdout
    engine = create_engine(url)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def test_a_read_only_database_refuses_writes_on_postgresql(postgres_url: str) -> None:
    database = Database(postgres_url, read_only=True)
    try:
        with (
            pytest.raises(DBAPIError, match="read-only transaction"),
            database.transaction() as session,
        ):
            session.execute(text("insert into stock_levels (sku, quantity) values ('X', 1)"))
        with database.transaction() as session:  # reading is what it is for
            assert session.execute(text("select count(*) from stock_levels")).scalar() is not None
    finally:
        database.dispose()


def table_contents(url: str) -> dict[str, tuple[int, str]]:
    """Each table's row count and a digest of its rows."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return {
                table: tuple(  # type: ignore[misc]
                    connection.execute(
                        text(
                            "select count(*), md5(coalesce(string_agg(t::text, '|'"
                            f" order by t::text), '')) from {table} t"
                        )
                    ).one()
                )
                for table in inspect(connection).get_table_names()
            }
    finally:
        engine.dispose()


def test_read_only_commands_on_postgresql_succeed_and_write_nothing(
    make_throwaway_database: object, tmp_path: Path
) -> None:
    url: str = make_throwaway_database()  # type: ignore[operator]
    schema.upgrade(url)
    variables = {"STOCK_SYNC_DATABASE_URL": url, "STOCK_SYNC_BROKER_URL": REDIS_URL}
    before = table_contents(url)

    for command in READ_ONLY[:-1]:  # health needs beat and a worker to pass: not here
        result = run(tmp_path, [CLI, *command], **variables)
        assert "Traceback" not in result.stderr, (command, result.stderr)
        if command[0] != "show" and command[:2] != ("stock", "get"):
            assert result.returncode == 0, (command, result.stderr)

    assert table_contents(url) == before
    assert list(tmp_path.iterdir()) == []

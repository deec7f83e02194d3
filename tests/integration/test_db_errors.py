"""Database URLs: only what we can open, errors that name the variable and never the password."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from stock_sync.adapters.db import (
    Database,
    configured_database_url,
    describe_database_error,
    normalise_database_url,
)
from stock_sync.adapters.settings import Settings
from stock_sync.domain.errors import ConfigurationError


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("mysql://stock:S3CRETPW@db/stock", "unsupported database 'mysql'"),
        ("postgresql+asyncpg://stock:S3CRETPW@db/stock", "unsupported database"),
        ("postgresql://stock:S3CRETPW@db:xx/stock", "not a database URL"),
        ("stock:S3CRETPW@db/stock", "not a database URL"),
    ],
)
def test_a_url_we_cannot_open_is_refused_without_its_password(url: str, reason: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        normalise_database_url(url)
    message = str(raised.value)
    assert message.startswith("STOCK_SYNC_DATABASE_URL: ") and reason in message
    assert "S3CRETPW" not in message and "\n" not in message


def test_an_unsupported_database_names_the_supported_ones() -> None:
    with pytest.raises(ConfigurationError, match=r"\(supported: postgresql, sqlite\)"):
        Database("mysql://u@h/db")


def test_a_database_error_is_one_line_without_the_password() -> None:
    url = "postgresql://stock:S3CRETPW@db-host/stock"
    error = OperationalError(
        "connect", {}, Exception(f'could not connect to "{url}"\nDETAIL: S3CRETPW rejected')
    )
    described = describe_database_error(error, url)
    assert described.startswith("cannot reach the database at postgresql://stock:***@db-host")
    assert "S3CRETPW" not in described and "\n" not in described


def test_the_embedded_default_prepares_its_folder(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "new" / "data", database_url="", embedded=True)
    url = configured_database_url(settings)
    assert (tmp_path / "new" / "data").is_dir() and url.startswith("sqlite:///")


def test_the_embedded_default_names_a_data_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigurationError, match=r"STOCK_SYNC_DATA_DIR: .* is a file"):
        configured_database_url(
            Settings(data_dir=tmp_path / "afile", database_url="", embedded=True)
        )


def test_a_sqlite_url_in_a_place_that_cannot_be_created_names_the_variable(
    tmp_path: Path,
) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigurationError, match="STOCK_SYNC_DATABASE_URL: cannot create"):
        Database(f"sqlite:///{tmp_path / 'afile' / 'below' / 'x.sqlite3'}")


def test_a_vanished_server_or_client_is_noticed_in_seconds(database: Database) -> None:
    """The client's libpq keepalives and TCP user timeout, and the database's end for a
    transaction left idle by a vanished client (migration 0009): a partition must not hold
    row locks, or a stage, for the kernel's 15 minutes."""
    with database.engine.connect() as connection:
        dsn = connection.connection.dbapi_connection.get_dsn_parameters()
        server_side = connection.exec_driver_sql("SHOW idle_in_transaction_session_timeout")
        assert server_side.scalar() == "30s"
    assert (dsn["keepalives"], dsn["keepalives_idle"], dsn["tcp_user_timeout"]) == (
        "1",
        "10",
        "30000",
    )

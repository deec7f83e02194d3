"""Migrations agree with the models; settings come from the environment and fail loudly."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from stock_sync.adapters import schema
from stock_sync.adapters.db import Database, normalise_database_url
from stock_sync.adapters.models import Base
from stock_sync.adapters.settings import load_settings
from stock_sync.adapters.stock_ledger import get_stock, set_stock
from stock_sync.domain.errors import ConfigurationError

TABLES = {"pending_stock_operations", "stock_levels", "stock_movements", "operation_events"}


def test_autogenerate_finds_no_difference_between_migration_and_models(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_upgrade_downgrade_upgrade_on_postgresql(
    make_throwaway_database: Callable[[], str],
) -> None:
    url = make_throwaway_database()
    engine = create_engine(url)
    schema.upgrade(url)
    assert set(inspect(engine).get_table_names()) >= TABLES
    schema.downgrade(url)
    assert not TABLES & set(inspect(engine).get_table_names())
    schema.upgrade(url)
    assert set(inspect(engine).get_table_names()) >= TABLES
    engine.dispose()


def test_the_sweep_index_exists(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    indexes = {
        ix["name"]: ix["column_names"]
        for ix in inspect(engine).get_indexes("pending_stock_operations")
    }
    assert indexes["ix_pending_stock_operations_status_updated_at"] == ["status", "updated_at"]
    engine.dispose()


def test_the_same_schema_runs_on_sqlite_in_wal_mode(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'embedded.sqlite3'}"
    schema.upgrade(url)
    database = Database(url)
    with database.transaction() as session:
        set_stock(session, "A", 4)
    with database.transaction() as session:
        assert get_stock(session, "A") == 4
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert session.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    database.dispose()
    assert sqlite3.connect(tmp_path / "embedded.sqlite3").execute(
        "PRAGMA journal_mode"
    ).fetchone() == ("wal",)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@h:5432/db", "postgresql+psycopg2://u:p@h:5432/db"),
        ("postgres://u@h/db", "postgresql+psycopg2://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_postgresql_urls_are_pinned_to_psycopg2(given: str, expected: str) -> None:
    assert normalise_database_url(given) == expected


def test_a_plain_postgresql_url_connects(postgres_url: str) -> None:
    plain = postgres_url.replace("postgresql+psycopg2://", "postgresql://")
    database = Database(plain)
    with database.transaction() as session:
        assert session.execute(text("select 1")).scalar() == 1
    database.dispose()


def test_the_embedded_set_up_runs_only_when_asked_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("STOCK_SYNC_DATABASE_URL", "STOCK_SYNC_BROKER_URL", "STOCK_SYNC_EMBEDDED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STOCK_SYNC_DATA_DIR", str(tmp_path))
    production = load_settings()
    with pytest.raises(ConfigurationError, match=r"^no database configured: set STOCK_SYNC_DAT"):
        production.effective_database_url  # noqa: B018
    with pytest.raises(ConfigurationError, match=r"^no broker configured: set STOCK_SYNC_BROKER"):
        production.effective_broker_url  # noqa: B018
    assert production.missing_servers() == ["STOCK_SYNC_DATABASE_URL", "STOCK_SYNC_BROKER_URL"]
    assert not production.uses_sqlite_database and not production.uses_filesystem_broker

    monkeypatch.setenv("STOCK_SYNC_EMBEDDED", "1")
    settings = load_settings()
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'stock_sync.sqlite3'}"
    assert settings.effective_broker_url == "filesystem://"
    assert settings.missing_servers() == []


def test_fractional_backoff_and_per_stage_limits_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STOCK_SYNC_RETRY_BACKOFF_BASE_S", "0.05")
    monkeypatch.setenv("STOCK_SYNC_RETRY_BACKOFF_MAX_S", "0.4")
    monkeypatch.setenv("STOCK_SYNC_MAX_RETRIES_STOCK_DEDUCTED", "3")
    policy = load_settings().retry_policy("stock_deducted")
    assert (policy.max_retries, policy.base_s, policy.max_s) == (3, 0.05, 0.4)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STOCK_SYNC_MAX_RETRIES_PENDING", "three"),
        ("STOCK_SYNC_MAX_RETRIES_ROLLBACK", "-1"),
        ("STOCK_SYNC_RETRY_BACKOFF_BASE_S", "fast"),
        ("STOCK_SYNC_MICROSERVICE_TIMEOUT_S", "0"),
        ("STOCK_SYNC_STUCK_AFTER_S", "soon"),
        ("STOCK_SYNC_LOG_LEVEL", "LOUD"),
    ],
)
def test_a_malformed_value_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    message = str(raised.value)
    assert variable in message and "\n" not in message


def test_backoff_max_below_base_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOCK_SYNC_RETRY_BACKOFF_BASE_S", "5")
    monkeypatch.setenv("STOCK_SYNC_RETRY_BACKOFF_MAX_S", "1")
    with pytest.raises(ConfigurationError, match="STOCK_SYNC_RETRY_BACKOFF_MAX_S"):
        load_settings()

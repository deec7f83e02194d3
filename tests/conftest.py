"""Shared fixtures: a throwaway PostgreSQL database per run, clean tables per test.

PostgreSQL and Redis must answer on localhost (``make test`` makes sure they do). Override with
STOCK_SYNC_TEST_POSTGRES_URL (an admin connection) and STOCK_SYNC_TEST_REDIS_URL.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from stock_sync import schema
from stock_sync.db import Database, normalise_database_url, reset_databases
from stock_sync.settings import get_settings

ADMIN_URL = os.environ.get(
    "STOCK_SYNC_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@localhost:5432/postgres"
)
REDIS_URL = os.environ.get("STOCK_SYNC_TEST_REDIS_URL", "redis://localhost:6379/0")
TABLES = ("operation_events", "stock_movements", "stock_levels", "pending_stock_operations")


def _admin_execute(statement: str) -> None:
    engine = create_engine(normalise_database_url(ADMIN_URL), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(statement))
    engine.dispose()


@pytest.fixture(scope="session")
def make_throwaway_database() -> Iterator[object]:
    """A factory of empty PostgreSQL databases, all dropped at the end of the run."""
    created: list[str] = []

    def make() -> str:
        name = f"stock_sync_test_{uuid.uuid4().hex[:12]}"
        _admin_execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return normalise_database_url(ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")

    yield make
    reset_databases()
    for name in created:
        _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url(make_throwaway_database: object) -> str:
    """The run's migrated test database; also the configured database of this process."""
    url: str = make_throwaway_database()  # type: ignore[operator]
    schema.upgrade(url)
    os.environ["STOCK_SYNC_DATABASE_URL"] = url
    get_settings.cache_clear()
    return url


@pytest.fixture(scope="session")
def database(postgres_url: str) -> Iterator[Database]:
    db = Database(postgres_url)
    yield db
    db.dispose()


@pytest.fixture
def clean_database(database: Database) -> Database:
    """The test database with every table emptied."""
    with database.transaction() as session:
        session.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    return database

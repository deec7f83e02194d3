"""Throwaway PostgreSQL databases for the tests and the development tools: created under a
unique name through an admin connection, dropped (connections forced out) when done.

The one place that writes CREATE DATABASE and DROP DATABASE: the test suite's database
factory and the benchmark's, chaos's and memory tool's run databases both come from here."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

from sqlalchemy import create_engine, text

from stock_sync.adapters import schema
from stock_sync.adapters.db import normalise_database_url, reset_databases


def admin_execute(admin_url: str, statement: str) -> None:
    """Run ``statement`` outside a transaction (CREATE/DROP DATABASE refuse to run in one)."""
    engine = create_engine(normalise_database_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(statement))
    finally:
        engine.dispose()


def database_url(admin_url: str, name: str) -> str:
    """The URL of database ``name`` on the server (and as the user) of ``admin_url``."""
    return normalise_database_url(admin_url.rsplit("/", 1)[0] + f"/{name}")


def drop_database(admin_url: str, name: str) -> None:
    admin_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class ThrowawayDatabases:
    """Empty databases named ``<prefix>_<12 hex>``, all dropped by ``drop_all``.

    ``create_options`` is appended to CREATE DATABASE (a template, a locale, ...)."""

    def __init__(self, admin_url: str, prefix: str) -> None:
        self.admin_url = admin_url
        self.prefix = prefix
        self.created: list[str] = []

    def create(self, create_options: str = "") -> str:
        """A new empty database; its URL."""
        name = f"{self.prefix}_{uuid.uuid4().hex[:12]}"
        admin_execute(self.admin_url, f'CREATE DATABASE "{name}" {create_options}'.rstrip())
        self.created.append(name)
        return database_url(self.admin_url, name)

    def drop_all(self) -> None:
        """Drop every database made here, after closing this process's pooled connections."""
        reset_databases()
        while self.created:
            drop_database(self.admin_url, self.created.pop())


@contextlib.contextmanager
def throwaway_database(admin_url: str, prefix: str, create_options: str = "") -> Iterator[str]:
    """A new, migrated database's URL; dropped on exit."""
    databases = ThrowawayDatabases(admin_url, prefix)
    try:
        url = databases.create(create_options)
        schema.upgrade(url)
        yield url
    finally:
        databases.drop_all()

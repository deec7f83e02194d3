"""Engines and sessions, built once per process (never at import time).

A Celery prefork worker forks after importing this module, so the engine is keyed by the
process id: a forked child builds its own pool instead of sharing its parent's sockets.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from stock_sync.adapters.redaction import one_line, redact, redact_url, shown_value, url_secrets
from stock_sync.adapters.settings import (
    DATABASE_URL_VARIABLE,
    Settings,
    database_kind,
    get_settings,
    prepared_data_dir,
)
from stock_sync.adapters.telemetry import traced_engine
from stock_sync.domain.errors import ConfigurationError

SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalise_database_url(url: str) -> str:
    """Pin PostgreSQL URLs to psycopg2, the driver we ship; refuse what we cannot open.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, which is not installed. The
    error names the variable and shows the URL with its password masked.
    """
    try:
        database_kind(url)
        parsed = make_url(url)
    except ValueError as error:
        raise ConfigurationError(
            f"{DATABASE_URL_VARIABLE}: {error} (got {shown_value(redact_url(url))})"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed.render_as_string(hide_password=False)


def configured_database_url(settings: Settings, *, read_only: bool = False) -> str:
    """The database URL to open (ConfigurationError naming STOCK_SYNC_DATABASE_URL when none is
    configured outside the embedded set-up); on the embedded set-up its folder,
    STOCK_SYNC_DATA_DIR, is made ready first so a bad one is named instead of failing inside
    SQLite, unless the caller only reads (it creates nothing)."""
    url = settings.effective_database_url
    if not settings.database_url and not read_only:
        prepared_data_dir(settings)
    return url


def _prepare_sqlite_folder(database: str) -> None:
    folder = os.path.dirname(os.path.abspath(database))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ConfigurationError(
            f"{DATABASE_URL_VARIABLE}: cannot create the folder of the SQLite database "
            f"{one_line(folder)}: {error.strerror or error}"
        ) from None


def describe_database_error(error: SQLAlchemyError, url: str) -> str:
    """One line for an operator: what went wrong with the database at ``url`` (its password
    masked), and what to do when we know."""
    cause = getattr(error, "orig", None) or error
    lines = str(cause).strip().splitlines() or [type(cause).__name__]
    text = one_line(redact(lines[0], url_secrets(url)))
    where = redact_url(url)
    if ("does not exist" in text and "relation" in text) or "no such table" in text:
        return f"the database at {where} has no schema yet: run 'stock-sync db upgrade'"
    if "connect" in text.lower():
        return f"cannot reach the database at {where}: {text}"
    return f"database error at {where}: {text}"


def _enable_sqlite_concurrency(engine: Engine, *, read_only: bool = False) -> None:
    """WAL + busy timeout + BEGIN IMMEDIATE, so two worker processes queue instead of failing.

    pysqlite's own lazy BEGIN lets a reader upgrade to a writer mid-transaction and fail at once
    with 'database is locked'; taking the write lock up front makes writers wait their turn.
    A read-only engine neither switches the journal mode nor takes the write lock, and SQLite
    refuses every write on its connections (``query_only``).
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if read_only:
            cursor.execute("PRAGMA query_only=ON")
        else:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _refuse_a_missing_sqlite_file(database: str) -> None:
    """A read-only engine never creates its SQLite file (connecting would): refused, named.
    (Not ``mode=ro``: such a connection cannot remove the WAL's -wal and -shm files when it
    closes, and they would stay behind; ``query_only`` refuses the writes just the same.)"""
    if not os.path.exists(database):
        raise ConfigurationError(
            f"no database at {one_line(database)} (a command that only reads creates none):"
            " run 'stock-sync db upgrade'"
        )


# libpq's TCP settings: a server that vanished (a partition, a dead host) fails the call that
# waits on it in about 25 s (keepalives) or 30 s (data never acknowledged), instead of after
# the kernel's 15 min of retransmissions, while Celery's soft time limit cannot interrupt it.
# Client-side only: nothing is sent in the startup packet that PgBouncer would refuse.
POSTGRES_CONNECT_ARGS = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def build_engine(url: str, *, autocommit: bool = False, read_only: bool = False) -> Engine:
    """An engine for ``url`` with the pool and dialect settings stock-sync relies on;
    ``read_only``: it creates nothing and every transaction it opens is read-only."""
    url = normalise_database_url(url)
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            if read_only:
                _refuse_a_missing_sqlite_file(os.path.abspath(database))
            else:
                _prepare_sqlite_folder(database)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _enable_sqlite_concurrency(engine, read_only=read_only)
        return traced_engine(engine)
    if read_only:
        # BEGIN READ ONLY for each transaction (psycopg2 sends it with the BEGIN, no session
        # SET that would stay on a PgBouncer connection); never on an autocommit engine.
        assert not autocommit, "a read-only engine is not an autocommit one"
        engine = create_engine(
            url,
            pool_pre_ping=False,
            pool_size=1,
            max_overflow=2,
            connect_args=POSTGRES_CONNECT_ARGS,
            execution_options={"postgresql_readonly": True},
        )
        return traced_engine(engine)
    # No pre-ping: it costs a round trip on every checkout (about a fifth of the pipeline's
    # throughput, measured). A connection broken by a server restart fails one statement and
    # SQLAlchemy then invalidates the whole pool; the stage's retry runs on fresh connections.
    engine = create_engine(
        url,
        pool_pre_ping=False,
        pool_recycle=1800,
        pool_size=2 if autocommit else 5,
        max_overflow=10,
        connect_args=POSTGRES_CONNECT_ARGS,
        **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}),
    )
    return traced_engine(engine)  # its SQL in the current trace, when tracing is on


class Database:
    """One engine and its session factory; ``read_only`` for the commands that only read:
    they create nothing (no SQLite file) and write nothing (every transaction is read-only)."""

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.url = normalise_database_url(url)
        self.read_only = read_only
        self.engine = build_engine(self.url, read_only=read_only)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Connections opened in autocommit once, so a lock-free read never switches modes.
        # (A read-only one has none: its reads go through its read-only transactions.)
        self._peek_engine = (
            self.engine
            if read_only
            else self.engine.execution_options(isolation_level="AUTOCOMMIT")
            if not self.is_postgresql
            else build_engine(self.url, autocommit=True)
        )

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session inside one transaction: committed on success, rolled back on error.

        Callbacks registered with :func:`before_commit` run last inside it; those registered
        with :func:`after_commit` once it has committed and its connection is back in the
        pool (never when it rolls back).
        """
        with self.sessions() as session:
            with session.begin():
                yield session
                _run(session, _BEFORE_COMMIT)
            callbacks = session.info.pop(_AFTER_COMMIT, [])
        for callback in callbacks:
            callback()

    @contextmanager
    def core_transaction(self) -> Iterator[Connection]:
        """As :meth:`transaction`, on a bare connection: for the stages' hot path, which speaks
        Core and has no use for a Session's unit of work."""
        with self.engine.connect() as connection:
            try:
                with connection.begin():
                    yield connection
                    _run(connection, _BEFORE_COMMIT)
                callbacks = connection.info.pop(_AFTER_COMMIT, [])
            finally:
                # A connection's info outlives it in the pool: the transaction's own state
                # (hooks, buffered events: keys under "stock_sync.") must not leak to the next.
                for key in [k for k in connection.info if str(k).startswith(_STATE_PREFIX)]:
                    del connection.info[key]
        for callback in callbacks:
            callback()

    @contextmanager
    def peek(self) -> Iterator[Connection]:
        """A connection for a lock-free read outside any transaction of ours: on PostgreSQL in
        autocommit, so no BEGIN or COMMIT round trip. For checks that a locked transaction
        repeats before acting (the stages' "does this still apply?")."""
        engine = self._peek_engine if self.is_postgresql else self.engine
        with engine.connect() as connection:
            yield connection

    @contextmanager
    def single_statement(self) -> Iterator[Connection]:
        """A connection whose every statement commits on its own: on PostgreSQL in autocommit
        (one round trip for a one-statement write such as a stamp), on SQLite one transaction
        committed at the end."""
        if self.is_postgresql:
            with self._peek_engine.connect() as connection:
                yield connection
            return
        with self.engine.begin() as connection:
            yield connection

    @contextmanager
    def snapshot(self) -> Iterator[Session]:
        """A read-only transaction that sees one consistent snapshot of the whole database
        (REPEATABLE READ on PostgreSQL; SQLite's transactions are serializable already)."""
        with self.sessions() as session, session.begin():
            if self.is_postgresql:
                session.connection(
                    execution_options={
                        "isolation_level": "REPEATABLE READ",
                        "postgresql_readonly": True,
                    }
                )
            yield session

    def dispose(self, *, close: bool = True) -> None:
        """Drop the pooled connections; after a fork, ``close=False`` leaves the parent's be."""
        self.engine.dispose(close=close)
        self._peek_engine.dispose(close=close)


@contextmanager
def try_advisory_lock(database: Database, key: int) -> Iterator[bool]:
    """Try once, without waiting, to take PostgreSQL's advisory lock ``key``; yields whether it
    was taken, and holds it until the block ends.

    The lock belongs to a transaction kept open for the whole block, never to the connection:
    behind PgBouncer in transaction pooling a session-level lock would stay on whichever server
    connection ran the statement, after that connection went back to the pool (and every later
    try would fail until it was recycled). The transaction only takes the lock: it writes
    nothing and ends with a rollback, which releases the lock, as does a dropped connection.
    It holds one server connection for the block, so a pool needs room for another besides it.
    """
    with database.engine.connect() as connection:
        transaction = connection.begin()
        try:
            statement = text("select pg_try_advisory_xact_lock(:key)")
            yield bool(connection.execute(statement, {"key": key}).scalar())
        finally:
            transaction.rollback()


# Per-transaction state kept in a Session's or Connection's ``info`` uses keys under this.
_STATE_PREFIX = "stock_sync."
_BEFORE_COMMIT = _STATE_PREFIX + "before_commit"
_AFTER_COMMIT = _STATE_PREFIX + "after_commit"

TransactionOwner = Session | Connection


def before_commit(owner: TransactionOwner, callback: Callable[[], None]) -> None:
    """Run ``callback`` at the end of ``owner``'s transaction, inside it, just before it
    commits (from :meth:`Database.transaction` or :meth:`Database.core_transaction`)."""
    owner.info.setdefault(_BEFORE_COMMIT, []).append(callback)


def after_commit(owner: TransactionOwner, callback: Callable[[], None]) -> None:
    """Run ``callback`` after ``owner``'s transaction commits, outside it; dropped on rollback.

    For side effects that must neither run inside a transaction (a network call would hold
    its locks) nor announce a change that rolled back: notifications, enqueues.
    """
    owner.info.setdefault(_AFTER_COMMIT, []).append(callback)


def _run(owner: TransactionOwner, key: str) -> None:
    for callback in owner.info.pop(key, []):
        callback()


_databases: dict[tuple[int, str, bool], Database] = {}
_databases_lock = threading.Lock()


def get_database(settings: Settings | None = None, *, read_only: bool = False) -> Database:
    """The process's Database for the configured URL, built on first use in this process
    (``read_only``: see :class:`Database`)."""
    settings = settings or get_settings()
    key = (os.getpid(), settings.effective_database_url, read_only)
    with _databases_lock:
        database = _databases.get(key)
        if database is None:
            url = configured_database_url(settings, read_only=read_only)
            database = _databases[key] = Database(url, read_only=read_only)
        return database


def reset_databases(*, close: bool = True) -> None:
    """Forget every cached engine; after a fork pass ``close=False`` so the parent's
    connections are left alone rather than closed under it."""
    with _databases_lock:
        for database in _databases.values():
            database.dispose(close=close)
        _databases.clear()

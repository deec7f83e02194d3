"""Probes of the parts a deployment needs: the database, the broker, the microservice.

Each probe asks one question with short timeouts of its own and answers it, or raises: what
the answer means (healthy or not, what an operator should do) is decided by
stock_sync/services/health.py, and the metrics read the broker's queue length here.
A probe changes nothing: no file created, no message sent, no marketplace call of the contract.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from stock_sync.adapters.db import describe_database_error, normalise_database_url
from stock_sync.adapters.maintenance_runs import LastRun, last_runs
from stock_sync.adapters.settings import Settings, database_kind

if TYPE_CHECKING:
    from stock_sync.adapters.schema import DatabaseRevision

# --- the database -----------------------------------------------------------------------------


def _probe_engine(settings: Settings, timeout_s: float) -> Engine:
    """An engine of its own for one check: no pool, short connect and statement timeouts."""
    url = normalise_database_url(settings.effective_database_url)
    if database_kind(url) == "sqlite":
        database = make_url(url).database or ""
        if database and database != ":memory:" and not Path(database).exists():
            # Connecting would create an empty file: a health check must change nothing.
            raise FileNotFoundError(f"no database file at {database}: run 'stock-sync db upgrade'")
        return create_engine(url, poolclass=NullPool, connect_args={"timeout": timeout_s})
    return create_engine(
        url,
        poolclass=NullPool,
        # libpq takes whole seconds (and at least 2)
        connect_args={"connect_timeout": max(2, round(timeout_s))},
    )


def _limit_statements(connection: Connection, timeout_s: float) -> None:
    """A statement timeout for this transaction only: SET LOCAL rather than a startup
    ``options`` parameter, which PgBouncer refuses unless told to ignore it."""
    if connection.dialect.name == "postgresql":
        connection.execute(text(f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}"))


@contextlib.contextmanager
def _probe(settings: Settings, timeout_s: float) -> Iterator[Engine]:
    engine = _probe_engine(settings, timeout_s)
    try:
        yield engine
    finally:
        engine.dispose()


def database_revision(settings: Settings, timeout_s: float) -> DatabaseRevision:
    """The database's migration revision and the code's heads, asked within ``timeout_s``."""
    # imported here: alembic costs every worker ~80 ms at start, and only this probe needs it
    from stock_sync.adapters.schema import revision_of

    with _probe(settings, timeout_s) as engine, engine.connect() as connection:
        _limit_statements(connection, timeout_s)
        return revision_of(connection)


def maintenance_runs(settings: Settings, timeout_s: float) -> dict[str, LastRun]:
    """The last run of every maintenance task (and beat's last send), asked within ``timeout_s``."""
    with _probe(settings, timeout_s) as engine, Session(engine) as session:
        _limit_statements(session.connection(), timeout_s)
        return last_runs(session)


def describe_database_failure(error: Exception, settings: Settings) -> str:
    """One line for what a database probe raised."""
    if isinstance(error, SQLAlchemyError):
        return describe_database_error(error, settings.effective_database_url)
    if isinstance(error, FileNotFoundError):
        return str(error)
    return f"{type(error).__name__}: {error}"


# --- the broker -------------------------------------------------------------------------------


def connect_broker(url: str, timeout_s: float) -> None:
    """Open and close a kombu connection to the broker at ``url``; raises if it does not answer."""
    from kombu.connection import Connection

    connect: Any = Connection  # kombu is untyped
    options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    with connect(url, connect_timeout=timeout_s, transport_options=options) as connection:
        connection.ensure_connection(
            max_retries=1, interval_start=0, interval_step=0, interval_max=0, timeout=timeout_s
        )


def queue_length(app: Any, queue_name: str) -> int | None:
    """Messages waiting in ``queue_name`` on ``app``'s broker; None when the broker does not
    answer. Never raises, and gives up at once rather than retrying a dead broker."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=0)
            channel = connection.default_channel
            return int(channel.queue_declare(queue=queue_name, passive=True).message_count)
    except Exception as error:  # a metric must not take the caller down with the broker
        # Redis keeps no key for an empty list, so an empty queue reads as a missing one.
        return 0 if "NOT_FOUND" in str(error) else None


# --- the microservice -------------------------------------------------------------------------

_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")\]]+")


class Unreachable(Exception):
    """No HTTP answer; the message is the telling part of the reason."""


def _connection_problem(error: Exception) -> str:
    """The telling part of a requests error (its message nests urllib3's several deep)."""
    import requests

    if isinstance(error, requests.Timeout):
        return "no answer in time"
    found = _ERRNO.search(str(error))
    return found.group(0).strip() if found else type(error).__name__


def http_status(url: str, timeout_s: float) -> int:
    """The HTTP status a GET of ``url`` answers (redirects not followed, body not read);
    raises :class:`Unreachable` when nothing answers."""
    import requests

    with requests.Session() as session:
        session.trust_env = False  # as the microservice client: no proxy the worker would skip
        try:
            answer = session.get(
                url, timeout=(min(timeout_s, 3.0), timeout_s), allow_redirects=False, stream=True
            )
            answer.close()
        except requests.RequestException as error:
            raise Unreachable(_connection_problem(error)) from error
    return int(answer.status_code)

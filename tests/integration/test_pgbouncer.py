"""PostgreSQL behind PgBouncer in transaction pooling: a server connection serves whichever client
transaction comes next, so nothing may outlive a transaction on it (session advisory locks,
session SETs, LISTEN, prepared statements, temporary tables, cursors WITH HOLD).

A pgbouncer of the test's own (Debian's package, `make test` installs it) listens on a free
port in front of the run's database with a pool of two server connections, so that anything
left on one is met again at once. The in-process worker and the producer run through it (their
STOCK_SYNC_DATABASE_URL points at it); assertions read PostgreSQL directly.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url

from stock_sync.adapters import schema
from stock_sync.adapters.db import Database, try_advisory_lock
from stock_sync.adapters.models import utcnow
from stock_sync.adapters.settings import get_settings, load_settings
from stock_sync.composition import build_services, get_services, reset_services, sweeper_for
from stock_sync.producer import request_cancellation
from stock_sync.services.sweeps import SWEEP_ADVISORY_LOCK_KEY
from tests.support import Pipeline, insert_operation, order

POOL_SIZE = 2
START_TIMEOUT_S = 30.0
# Parameters PgBouncer itself keeps in step on every server connection it hands out (it sends
# them as SETs): not state that our code left behind.
PGBOUNCER_TRACKED = {
    "application_name",
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "standard_conforming_strings",
    "timezone",
}


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(found):
        pytest.fail("pgbouncer is not installed: run `make tools` (tests/ensure_pgbouncer.sh)")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PgBouncer:
    """``pgbouncer`` in the foreground, ``pool_mode = transaction``, forwarding every database
    name to ``upstream``'s server. Run as the postgres user when we are root (it refuses root)."""

    def __init__(self, upstream: str) -> None:
        server = make_url(upstream)
        self.port = free_port()
        self.user = server.username or "postgres"
        # Its own folder in /tmp: pytest's are closed to the postgres user.
        folder = self._folder = Path(tempfile.mkdtemp(prefix="stock-sync-pgbouncer-"))
        (folder / "users.txt").write_text(f'"{self.user}" ""\n')
        (folder / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={server.host or '127.0.0.1'} port={server.port or 5432}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
            f"pool_mode = transaction\ndefault_pool_size = {POOL_SIZE}\n"
            "max_client_conn = 500\nreserve_pool_size = 0\n"
        )
        command = [pgbouncer_binary()]
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres")
            command += ["-u", "postgres"]
        self._stderr = (folder / "stderr.log").open("wb")
        self.process = subprocess.Popen(
            [*command, str(folder / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def url(self, upstream: str) -> str:
        """``upstream``'s database, reached through this pgbouncer."""
        return make_url(upstream).set(host="127.0.0.1", port=self.port).render_as_string(False)

    def wait_until_answering(self, upstream: str) -> None:
        engine = create_engine(self.url(upstream))
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                assert self.process.poll() is None, self.log()
                try:
                    with engine.connect() as connection:
                        connection.execute(text("select 1"))
                    return
                except Exception:
                    assert time.monotonic() < deadline, "pgbouncer did not answer\n" + self.log()
                    time.sleep(0.05)
        finally:
            engine.dispose()

    def log(self) -> str:
        return (self._folder / "stderr.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._stderr.close()
        shutil.rmtree(self._folder, ignore_errors=True)


@pytest.fixture(scope="module")
def pgbouncer(postgres_url: str) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(postgres_url)
    try:
        bouncer.wait_until_answering(postgres_url)
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def through_pgbouncer(
    pipeline: Pipeline, pgbouncer: PgBouncer, postgres_url: str
) -> Iterator[Database]:
    """The worker, the producer and the sweeper of this process on the database through
    pgbouncer (the settings they read); yields a Database of that URL for the test's own use."""
    url = pgbouncer.url(postgres_url)
    saved = os.environ["STOCK_SYNC_DATABASE_URL"]
    os.environ["STOCK_SYNC_DATABASE_URL"] = url
    get_settings.cache_clear()
    reset_services()
    database = Database(url)
    try:
        assert get_services().database.url == database.url  # the worker reads the same
        yield database
    finally:
        database.dispose()
        os.environ["STOCK_SYNC_DATABASE_URL"] = saved
        get_settings.cache_clear()
        reset_services()


def advisory_locks(pipeline: Pipeline) -> int:
    """Advisory locks held on the database right now, by anyone (read directly, not through
    pgbouncer)."""
    with pipeline.database.peek() as connection:
        statement = text(
            "select count(*) from pg_locks l join pg_database d on d.oid = l.database"
            " where l.locktype = 'advisory' and d.datname = current_database()"
        )
        return int(connection.execute(statement).scalar_one())


def leftovers(connection: Connection) -> dict[str, object]:
    """Session state on the server connection running ``connection``'s transaction."""
    queries = {
        "advisory locks": "select count(*) from pg_locks"
        " where pid = pg_backend_pid() and locktype = 'advisory'",
        "LISTEN channels": "select count(*) from pg_listening_channels()",
        "prepared statements": "select count(*) from pg_prepared_statements",
        "cursors": "select count(*) from pg_cursors",
        "temporary tables": "select count(*) from pg_class"
        " where relnamespace = pg_my_temp_schema() and pg_my_temp_schema() <> 0",
        "session settings": "select coalesce(string_agg(name, ','), '') from pg_settings"
        " where source = 'session' and name <> all(:tracked)",
        "transaction characteristics": "select current_setting('default_transaction_isolation')"
        " || ',' || current_setting('default_transaction_read_only')",
    }
    return {
        what: connection.execute(text(query), {"tracked": sorted(PGBOUNCER_TRACKED)}).scalar_one()
        for what, query in queries.items()
    }


def every_server_connection_is_clean(database: Database) -> None:
    """Open one transaction per server connection of the pool at once (so each runs on a
    different one) and look at what each server connection carries."""
    with ExitStack() as stack:
        found = []
        for _ in range(POOL_SIZE):
            connection = stack.enter_context(database.engine.connect())
            stack.enter_context(connection.begin())
            found.append(
                (
                    connection.execute(text("select pg_backend_pid()")).scalar_one(),
                    leftovers(connection),
                )
            )
    assert len({pid for pid, _ in found}) == POOL_SIZE  # really every server connection
    clean = {
        "advisory locks": 0,
        "LISTEN channels": 0,
        "prepared statements": 0,
        "cursors": 0,
        "temporary tables": 0,
        "session settings": "",
        "transaction characteristics": "read committed,off",
    }
    assert [state for _, state in found] == [clean] * POOL_SIZE


def test_an_order_a_cancellation_and_a_sweep_run_through_pgbouncer(
    pipeline: Pipeline, through_pgbouncer: Database
) -> None:
    pipeline.set_stock(**{"SKU-P": 5})
    operation_id = pipeline.submit(order("bounced", ("SKU-P", 2)))
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "completed" and pipeline.stock("SKU-P") == 3

    cancelled = request_cancellation(operation_id, "ops", "through pgbouncer")
    assert cancelled.final_status.value == "cancelled" and pipeline.stock("SKU-P") == 5
    pipeline.wait_for(list(cancelled.adjustment_operation_ids))
    assert pipeline.fake.order("bounced")["fulfillment_status"] == "NEW"

    pipeline.fake.add_order(order("stranded", ("SKU-P", 1)))
    long_ago = utcnow() - timedelta(hours=1)
    stranded = insert_operation(
        pipeline.database,
        order_id="stranded",
        created_at=long_ago,
        updated_at=long_ago,
        dispatched_at=long_ago,
        attempt_started_at=long_ago,
    )  # a PENDING row whose attempt died an hour ago
    report = sweeper_for(get_services()).sweep()
    assert report.ran and report.redriven == [stranded]
    (redriven,) = pipeline.wait_for([stranded])
    assert redriven.status == "completed" and pipeline.stock("SKU-P") == 4
    assert pipeline.ledger_matches_stock("SKU-P")
    every_server_connection_is_clean(through_pgbouncer)


class HoldingDispatcher:
    """Asked to enqueue, it opens a transaction through pgbouncer instead and keeps it open
    until released. PgBouncer hands out server connections last in, first out, so that
    transaction sits on the one the sweep's own last transaction just gave back: a lock left
    on that connection is out of the sweep's reach when it lets go."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._held = ExitStack()
        self.enqueued: list[uuid.UUID] = []

    def enqueue_pipeline(self, operation_id: uuid.UUID, status: object, generation: int) -> None:
        self.enqueued.append(operation_id)
        connection = self._held.enter_context(self._database.engine.connect())
        self._held.enter_context(connection.begin())
        connection.execute(text("select 1"))  # the transaction now has its server connection

    def enqueue_rollback(self, adjustment_operation_id: uuid.UUID, generation: int) -> None:
        self.enqueue_pipeline(adjustment_operation_id, None, generation)

    def enqueue_probe(self, probe_id: int) -> None:
        pass

    def release(self) -> None:
        self._held.close()


def test_the_sweep_lock_does_not_stay_behind_on_a_pooled_connection(
    pipeline: Pipeline, through_pgbouncer: Database
) -> None:
    long_ago = utcnow() - timedelta(hours=1)
    stranded = insert_operation(  # its attempt died an hour ago
        pipeline.database,
        created_at=long_ago,
        updated_at=long_ago,
        dispatched_at=long_ago,
        attempt_started_at=long_ago,
    )
    holder = HoldingDispatcher(through_pgbouncer)
    services = build_services(load_settings(), dispatcher=holder, database=through_pgbouncer)
    held_sweeper = sweeper_for(services)
    # the held transaction takes the pool's second connection until the sweep ends: the
    # sweep's probe (its last transaction) would wait for it, so this round sends none
    held_sweeper._send_probe = lambda window: False  # type: ignore[method-assign]
    try:
        assert held_sweeper.sweep().redriven == [stranded] == holder.enqueued
    finally:
        holder.release()
    assert advisory_locks(pipeline) == 0  # let go, although the connection was busy

    sweeper = sweeper_for(get_services())
    for _ in range(2 * POOL_SIZE):  # in a row: each runs, whichever server connection it gets
        assert sweeper.sweep().ran
        assert advisory_locks(pipeline) == 0
    every_server_connection_is_clean(through_pgbouncer)

    with try_advisory_lock(through_pgbouncer, SWEEP_ADVISORY_LOCK_KEY) as held:
        assert held and advisory_locks(pipeline) == 1
        assert not sweeper.sweep().ran  # one holds it: the next skips
    assert advisory_locks(pipeline) == 0
    assert sweeper.sweep().ran


def test_the_migrations_run_through_pgbouncer(
    pgbouncer: PgBouncer, make_throwaway_database: object
) -> None:
    fresh: str = make_throwaway_database()  # type: ignore[operator]
    schema.upgrade(pgbouncer.url(fresh))
    assert schema.current(fresh).is_head  # read directly

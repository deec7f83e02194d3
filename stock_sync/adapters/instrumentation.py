"""Counters of SQL statements and transactions, for the benchmark; inert unless asked for.

Counted with SQLAlchemy's engine events, on every engine of the process (listeners on the
``Engine`` class): a *statement* is one ``before_cursor_execute`` (one cursor call, so an
executemany counts once; psycopg2's implicit ``BEGIN`` is not one), a *commit* or *rollback*
is one ``commit`` / ``rollback`` event of a transaction (savepoints are not counted), and a
statement sent in autocommit (a lock-free read, a one-statement write) is a transaction of its
own to PostgreSQL: counted as an *autocommit*.

In a worker: ``tasks.app`` calls :func:`count_sql_if_asked` at import. When
``STOCK_SYNC_COUNT_SQL_DIR`` names a folder, every process that runs SQL (each prefork child,
after the fork) counts into a small memory-mapped file of its own, ``sql-<pid>.counts`` in that
folder: four little-endian int64 (statements, commits, rollbacks, autocommits), updated in place
at each event, so whoever reads the files sees the totals so far without asking the worker anything
(the benchmark reads them while the worker is idle). Without the variable nothing is installed.

In the benchmark's own process: :class:`LabelledSqlCounter` counts the statements sent to one
database under a label (e.g. "producer" while submitting, "monitor" while polling).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine, event

COUNT_SQL_DIR_VARIABLE = "STOCK_SYNC_COUNT_SQL_DIR"
COUNT_FILE_SUFFIX = ".counts"
STATEMENTS, COMMITS, ROLLBACKS, AUTOCOMMITS = range(4)
_FIELDS = 4
_LAYOUT = struct.Struct(f"<{_FIELDS}q")


@dataclass(frozen=True)
class SqlCounts:
    """Statements sent and transactions ended (committed, rolled back, or a statement in
    autocommit)."""

    statements: int = 0
    commits: int = 0
    rollbacks: int = 0
    autocommits: int = 0

    @property
    def transactions(self) -> int:
        return self.commits + self.rollbacks + self.autocommits

    def __add__(self, other: SqlCounts) -> SqlCounts:
        return SqlCounts(
            self.statements + other.statements,
            self.commits + other.commits,
            self.rollbacks + other.rollbacks,
            self.autocommits + other.autocommits,
        )

    def __sub__(self, other: SqlCounts) -> SqlCounts:
        return SqlCounts(
            self.statements - other.statements,
            self.commits - other.commits,
            self.rollbacks - other.rollbacks,
            self.autocommits - other.autocommits,
        )


class _Sink(Protocol):
    def add(self, connection: Any, field: int) -> None: ...


_sink: _Sink | None = None
_sink_lock = threading.Lock()


def _on_execute(conn: Any, *_: Any) -> None:
    sink = _sink
    if sink is not None:
        sink.add(conn, STATEMENTS)
        if conn._is_autocommit_isolation():
            sink.add(conn, AUTOCOMMITS)


def _on_commit(conn: Any) -> None:
    sink = _sink
    if sink is not None and not conn._is_autocommit_isolation():
        sink.add(conn, COMMITS)


def _on_rollback(conn: Any) -> None:
    # an autocommit connection "rolls back" when closed: nothing reaches the database
    sink = _sink
    if sink is not None and not conn._is_autocommit_isolation():
        sink.add(conn, ROLLBACKS)


def install(sink: _Sink) -> None:
    """Count every engine's SQL into ``sink`` (replacing the sink installed before, if any)."""
    global _sink
    with _sink_lock:
        if not event.contains(Engine, "before_cursor_execute", _on_execute):
            event.listen(Engine, "before_cursor_execute", _on_execute)
            event.listen(Engine, "commit", _on_commit)
            event.listen(Engine, "rollback", _on_rollback)
        _sink = sink


def uninstall() -> None:
    """Stop counting (the listeners stay, doing nothing)."""
    global _sink
    with _sink_lock:
        _sink = None


# --- the worker's side: one memory-mapped file per process ---------------------------------


class _CountFile:
    """Four int64 in a shared mapping of ``path``: every increment lands in the page cache."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, _LAYOUT.size)
            self._map = mmap.mmap(fd, _LAYOUT.size)
        finally:
            os.close(fd)
        self._values = (ctypes.c_int64 * _FIELDS).from_buffer(self._map)

    def add(self, field: int) -> None:
        self._values[field] += 1


class PerProcessCountFiles:
    """A sink writing to ``folder/sql-<pid>.counts``, made by the first event of each process
    (a forked child gets its own file, never its parent's)."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._lock = threading.Lock()
        self._pid = -1
        self._file: _CountFile | None = None

    def add(self, connection: Any, field: int) -> None:
        with self._lock:
            if self._file is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._folder.mkdir(parents=True, exist_ok=True)
                self._file = _CountFile(self._folder / f"sql-{self._pid}{COUNT_FILE_SUFFIX}")
            self._file.add(field)


def count_sql_if_asked(environ: Mapping[str, str] = os.environ) -> bool:
    """Install the per-process count files when ``STOCK_SYNC_COUNT_SQL_DIR`` is set (the
    benchmark sets it for its worker); otherwise do nothing. True when installed."""
    folder = environ.get(COUNT_SQL_DIR_VARIABLE, "")
    if not folder:
        return False
    install(PerProcessCountFiles(Path(folder)))
    return True


def read_count_files(folder: Path) -> dict[int, SqlCounts]:
    """The counts so far of every process that wrote to ``folder``, by pid (exited ones too)."""
    counts: dict[int, SqlCounts] = {}
    for path in sorted(folder.glob(f"sql-*{COUNT_FILE_SUFFIX}")):
        data = path.read_bytes()
        if len(data) < _LAYOUT.size:
            continue  # created this instant, not sized yet
        pid = int(path.name.removeprefix("sql-").removesuffix(COUNT_FILE_SUFFIX))
        counts[pid] = SqlCounts(*_LAYOUT.unpack_from(data))
    return counts


def total(counts: Mapping[Any, SqlCounts]) -> SqlCounts:
    result = SqlCounts()
    for value in counts.values():
        result += value
    return result


# --- the benchmark's own process: counts by label ----------------------------------------------


class LabelledSqlCounter:
    """Counts the SQL sent to the database named ``database`` (others are ignored), under the
    label current at the time (``labelled``); "other" when none is set."""

    def __init__(self, database: str | None) -> None:
        self._database = database
        self._lock = threading.Lock()
        self._label = "other"
        self._counts: dict[str, list[int]] = {}

    @contextlib.contextmanager
    def labelled(self, label: str) -> Iterator[None]:
        previous, self._label = self._label, label
        try:
            yield
        finally:
            self._label = previous

    def add(self, connection: Any, field: int) -> None:
        if connection.engine.url.database != self._database:
            return
        with self._lock:
            self._counts.setdefault(self._label, [0] * _FIELDS)[field] += 1

    def counts(self) -> dict[str, SqlCounts]:
        """The totals so far, by label."""
        with self._lock:
            return {label: SqlCounts(*values) for label, values in self._counts.items()}

"""A requests session whose every exchange has to finish within a deadline, body included.

:func:`bounded_exchange` marks the exchange running on this thread; the pools of a session
made by :func:`pooled_session` tell it which connection it uses, and one watchdog thread per
process shuts that connection's socket down once the deadline passes, so a trickled answer
(headers or body) cannot outlive it. The watchdog and its thread are made on the first watched
exchange, never at import. :func:`read_capped` reads a body in chunks, up to a size cap and
within the deadline.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from stock_sync.domain.errors import InvalidInput

if TYPE_CHECKING:  # a typing-only protocol of urllib3
    from urllib3._base_connection import BaseHTTPConnection

_CHUNK_BYTES = 64 * 1024
_WATCH_POLL_S = 0.05
# With nothing to watch, the watchdog looks again this often (a deadline due earlier wakes it).
_IDLE_WAIT_S = 1.0


class DeadlinePassed(Exception):
    """The exchange's deadline passed between two reads."""


class TooLarge(Exception):
    """The body is longer than the cap; the rest is left unread."""


class Deadline:
    """The end of one exchange. When watched, the watchdog shuts the exchange's socket down
    once it passes, so a trickled answer (headers or body) cannot outlive it."""

    def __init__(self, seconds: float, *, watched: bool) -> None:
        self.seconds = seconds
        self._ends_at = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._finished = False
        self._connection: BaseHTTPConnection | None = None
        self._expired = False
        if watched:
            _watchdog().watch(self, self._ends_at)

    @property
    def finished(self) -> bool:
        return self._finished

    def remaining(self) -> float:
        return self._ends_at - time.monotonic()

    def passed(self) -> bool:
        return self._expired or self.remaining() <= 0

    def attach(self, connection: BaseHTTPConnection) -> None:
        """The pooled connection this exchange uses (from the pool, on this thread)."""
        with self._lock:
            if not self._finished:
                self._connection = connection

    def detach(self, connection: BaseHTTPConnection | None) -> None:
        """The connection goes back to the pool: never touch it again."""
        with self._lock:
            if self._connection is connection:
                self._connection = None

    def finish(self) -> None:
        with self._lock:
            self._finished = True
            self._connection = None

    def expire(self) -> bool:
        """Called by the watchdog once passed: shut the socket down. False when there is none
        yet (still connecting, within the connect timeout): look again a little later."""
        with self._lock:
            if self._finished:
                return True
            self._expired = True
            sock = getattr(self._connection, "sock", None)
            if not isinstance(sock, socket.socket):
                return False
            with suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once
            return True


class _Watchdog:
    """One daemon thread per process that expires the deadlines of running exchanges
    (a thread per exchange cost about 0.25 ms each); started by the first deadline watched."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # threads do not survive a fork

    def _reset(self) -> None:
        self._condition = threading.Condition()
        self._queue: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._wakes_at = 0.0  # when the thread wakes next on its own

    def watch(self, deadline: Deadline, at: float) -> None:
        with self._condition:
            self._drop_finished()  # the oldest usually are: the queue stays about in-flight size
            heapq.heappush(self._queue, (at, next(self._order), deadline))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="microservice-deadlines", daemon=True
                )
                self._thread.start()
            elif at < self._wakes_at:
                # due before the thread wakes: wake it (a later deadline, the usual case of
                # back-to-back requests, is found when it wakes, without a thread switch)
                self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                due = self._next_due()
            if due is not None and not due.expire():
                self.watch(due, time.monotonic() + _WATCH_POLL_S)

    def _next_due(self) -> Deadline | None:
        """The earliest deadline once it has passed; None after waiting for it (or, with none
        queued, for a while)."""
        self._drop_finished()
        now = time.monotonic()
        if not self._queue:
            self._wakes_at = now + _IDLE_WAIT_S
            self._condition.wait(_IDLE_WAIT_S)
            return None
        at, _, deadline = self._queue[0]
        wait = at - now
        if wait > 0:
            self._wakes_at = at
            self._condition.wait(wait)
            return None
        heapq.heappop(self._queue)
        return deadline

    def _drop_finished(self) -> None:
        while self._queue and self._queue[0][2].finished:
            heapq.heappop(self._queue)


_WATCHDOG: _Watchdog | None = None  # made by the first watched deadline
_WATCHDOG_LOCK = threading.Lock()
_ACTIVE = threading.local()  # the Deadline of the exchange running on this thread


def _watchdog() -> _Watchdog:
    global _WATCHDOG
    with _WATCHDOG_LOCK:
        if _WATCHDOG is None:
            _WATCHDOG = _Watchdog()
        return _WATCHDOG


@contextmanager
def bounded_exchange(seconds: float, *, watched: bool) -> Iterator[Deadline]:
    """The deadline of the exchange made on this thread inside the block. ``watched``: the
    watchdog interrupts a blocked read once it passes (only the pools of a session made by
    :func:`pooled_session` tell it which connection to interrupt)."""
    deadline = Deadline(seconds, watched=watched)
    _ACTIVE.deadline = deadline
    try:
        yield deadline
    finally:
        deadline.finish()
        _ACTIVE.deadline = None


class _WatchedHTTPPool(HTTPConnectionPool):
    """A pool that tells the running exchange's deadline which connection it uses."""

    def _get_conn(self, timeout: float | None = None) -> BaseHTTPConnection:
        connection = super()._get_conn(timeout)
        deadline: Deadline | None = getattr(_ACTIVE, "deadline", None)
        if deadline is not None:
            deadline.attach(connection)
        return connection

    def _put_conn(self, conn: BaseHTTPConnection | None) -> None:
        deadline: Deadline | None = getattr(_ACTIVE, "deadline", None)
        if deadline is not None:
            deadline.detach(conn)
        super()._put_conn(conn)


class _WatchedHTTPSPool(_WatchedHTTPPool, HTTPSConnectionPool):
    """The same for https (the watched methods first, then HTTPSConnectionPool's own)."""


class _DeadlineAdapter(HTTPAdapter):
    """An adapter whose pools tell the running exchange's deadline which connection it uses."""

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _WatchedHTTPPool,
            "https": _WatchedHTTPSPool,
        }


def pooled_session(pool_maxsize: int, base_url: str) -> requests.Session:
    """A session whose adapters keep up to ``pool_maxsize`` connections and never retry.

    The environment (proxy variables, a CA bundle variable) is read once, here: with
    ``trust_env`` requests reads it again, and looks for a .netrc file, on every call,
    which was a visible share of a worker's CPU.
    """
    if pool_maxsize < 1:
        raise InvalidInput(f"pool_maxsize must be >= 1, got {pool_maxsize}")
    session = requests.Session()
    session.proxies.update(requests.utils.get_environ_proxies(base_url))
    session.verify = (
        os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    )
    session.trust_env = False
    adapter = _DeadlineAdapter(pool_connections=1, pool_maxsize=pool_maxsize, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"Accept": "application/json", "User-Agent": "stock-sync"})
    return session


def read_capped(response: requests.Response, limit: int, deadline: Deadline) -> bytes:
    """The decoded body, read in chunks; TooLarge as soon as it is longer than ``limit``,
    DeadlinePassed once the deadline has passed."""
    declared = _declared_length(response)
    if declared is not None and declared > limit:
        raise TooLarge
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(_CHUNK_BYTES):
        if deadline.passed():
            raise DeadlinePassed
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _declared_length(response: requests.Response) -> int | None:
    """Content-Length of an unencoded body (an encoded one says nothing of its decoded size)."""
    if response.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        return None
    try:
        return int(response.headers.get("Content-Length", ""))
    except ValueError:
        return None

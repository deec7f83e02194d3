"""HTTP client for the Allegro microservice contract (see DESIGN.md, "The microservice contract").

Every outcome that is not a usable answer becomes one error of ``stock_sync.domain.errors``:
transient ones (network, timeout, 429, 5xx, 404 on GET, 409) carry ``retryable = True`` and the
Celery tasks retry them; permanent ones (422, other 4xx, a broken answer) do not. The client never
retries by itself, so the retry budget and its logging stay in one place, the tasks.

Every field of an answer is untrusted: strings are bounded by the database columns they end up
in and may hold no control character or lone surrogate, quantities are bounded, line ids are
unique, the body is read streamed up to ``max_response_bytes`` (decoded) and the whole exchange
has to finish within ``deadline_s``.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from http.client import HTTPException
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, Self
from urllib.parse import quote

import requests
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from stock_sync.domain.errors import (
    ContractViolation,
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    InvalidInput,
    MicroserviceRateLimited,
    MicroserviceServerError,
    MicroserviceTimeout,
    MicroserviceUnavailable,
    OrderNotFound,
    RevisionConflict,
    UnprocessableRequest,
)

if TYPE_CHECKING:  # a typing-only protocol of urllib3
    from urllib3._base_connection import BaseHTTPConnection

OrderStatus = Literal["BOUGHT", "FILLED_IN", "READY_FOR_PROCESSING", "CANCELLED"]

Revision = str | int
"""An order revision exactly as the microservice sent it (Allegro: a string such as
``"d8e8fca2"``; some wrappers: an integer). Opaque: compare it only for equality, echo it back
unchanged, type included."""

# Bounds of an answer. The string limits are the lengths of the columns the values end up in
# (stock_sync/adapters/models.py: order_id, account_name, line_item_id, sku: 128; the fulfillment
# status recorded before a sync: 32); tests/test_microservice_client.py checks that they still
# agree.
TEXT_MAX_CHARS = 128
FULFILLMENT_STATUS_MAX_CHARS = 32
REVISION_MAX_CHARS = 64
DEFAULT_MAX_LINE_QUANTITY = 1_000_000
MAX_LINE_QUANTITY_LIMIT = 2**31 - 1  # stock quantities are 32-bit integer columns
DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024
DEFAULT_DEADLINE_CAP_S = 30.0  # a default deadline is 3x the read timeout, at most this

_CONTRACT_BROKEN = "microservice response breaks the contract"
# The error codes of the IETF idempotency-key draft the wrapper follows (DESIGN.md).
IDEMPOTENCY_KEY_IN_FLIGHT = "IDEMPOTENCY_KEY_IN_FLIGHT"
IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
_MAX_DETAIL_CHARS = 200
_MAX_CONTRACT_CHARS = 600
_CHUNK_BYTES = 64 * 1024
_WATCH_POLL_S = 0.05
# Unicode category Cc (C0, DEL, C1) and the surrogate range (only lone ones survive decoding)
_FORBIDDEN_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


# --- the answer ---------------------------------------------------------------------------


def _forbidden_character(text: str) -> str | None:
    """What is wrong with ``text`` (its first control character or lone surrogate), or None."""
    found = _FORBIDDEN_CHARACTER.search(text)
    if found is None:
        return None
    code = ord(found.group())
    kind = "lone surrogate" if 0xD800 <= code <= 0xDFFF else "control character"
    return f"{kind} U+{code:04X} at index {found.start()}"


def _clean_text(value: object) -> object:
    """Before str validation (which would refuse a lone surrogate without saying why)."""
    problem = _forbidden_character(value) if isinstance(value, str) else None
    if problem is not None:
        raise PydanticCustomError(
            "forbidden_character", "must not contain a {problem}", {"problem": problem}
        )
    return value


Text = Annotated[str, Field(min_length=1, max_length=TEXT_MAX_CHARS), BeforeValidator(_clean_text)]
FulfillmentStatus = Annotated[
    str, Field(min_length=1, max_length=FULFILLMENT_STATUS_MAX_CHARS), BeforeValidator(_clean_text)
]


def revision_problem(value: object) -> str | None:
    """Why ``value`` is not a usable revision, or None when it is one."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return f"must be a string or an integer, got {type(value).__name__}"
    text = value if isinstance(value, str) else str(value)
    if not text:
        return "must not be empty"
    if len(text) > REVISION_MAX_CHARS:
        return f"must have at most {REVISION_MAX_CHARS} characters"
    problem = _forbidden_character(text)
    return None if problem is None else f"must not contain a {problem}"


def _validated_revision(value: object) -> Revision:
    problem = revision_problem(value)
    if problem is None and isinstance(value, str | int):
        return value
    raise PydanticCustomError("revision", problem or "must be a string or an integer")


def _max_line_quantity(context: object) -> int:
    if isinstance(context, Mapping):
        limit = context.get("max_line_quantity")
        if isinstance(limit, int):
            return limit
    return DEFAULT_MAX_LINE_QUANTITY


class OrderLineItem(BaseModel):
    """One line of a marketplace order: ``quantity`` units of the warehouse item ``sku``."""

    # strict: a contract answer with "2" for a quantity is a bug upstream, not something to guess
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    id: Text
    offer_id: Text
    sku: Text
    quantity: int = Field(ge=1)

    @field_validator("quantity")
    @classmethod
    def _bounded_quantity(cls, quantity: int, info: ValidationInfo) -> int:
        """At most ``max_line_quantity`` (validation context; default 1,000,000)."""
        limit = _max_line_quantity(info.context)
        if quantity > limit:
            raise PydanticCustomError(
                "less_than_equal", "Input should be less than or equal to {le}", {"le": limit}
            )
        return quantity


class MicroserviceOrder(BaseModel):
    """An order as the microservice reports it; ``revision`` guards the fulfillment update."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    id: Text
    account_name: Text | None
    revision: Annotated[Revision, PlainValidator(_validated_revision)]
    status: OrderStatus
    fulfillment_status: FulfillmentStatus
    line_items: list[OrderLineItem] = Field(min_length=1)

    @field_validator("line_items")
    @classmethod
    def _unique_line_ids(cls, line_items: list[OrderLineItem]) -> list[OrderLineItem]:
        first_index: dict[str, int] = {}
        for index, line in enumerate(line_items):
            if line.id in first_index:
                raise PydanticCustomError(
                    "duplicate_line_id",
                    "line item id {line_id} appears twice, at items {first} and {second}",
                    {"line_id": repr(line.id), "first": first_index[line.id], "second": index},
                )
            first_index[line.id] = index
        return line_items


# --- the deadline -------------------------------------------------------------------------


class _Deadline:
    """The end of one exchange. When watched, the watchdog shuts the exchange's socket down
    once it passes, so a trickled answer (headers or body) cannot outlive it."""

    def __init__(self, seconds: float, *, watchdog: _Watchdog | None) -> None:
        self.seconds = seconds
        self._ends_at = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._finished = False
        self._connection: BaseHTTPConnection | None = None
        self._expired = False
        if watchdog is not None:
            watchdog.watch(self, self._ends_at)

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
    (a thread per exchange cost about 0.25 ms each)."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # threads do not survive a fork

    def _reset(self) -> None:
        self._condition = threading.Condition()
        self._queue: list[tuple[float, int, _Deadline]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._wakes_at = 0.0  # when the thread wakes next on its own

    def watch(self, deadline: _Deadline, at: float) -> None:
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

    def _next_due(self) -> _Deadline | None:
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


# With nothing to watch, the watchdog looks again this often (a deadline due earlier wakes it).
_IDLE_WAIT_S = 1.0
_WATCHDOG = _Watchdog()


_ACTIVE = threading.local()  # the _Deadline of the exchange running on this thread


def _attach(connection: BaseHTTPConnection) -> BaseHTTPConnection:
    deadline: _Deadline | None = getattr(_ACTIVE, "deadline", None)
    if deadline is not None:
        deadline.attach(connection)
    return connection


def _detach(connection: BaseHTTPConnection | None) -> None:
    deadline: _Deadline | None = getattr(_ACTIVE, "deadline", None)
    if deadline is not None:
        deadline.detach(connection)


class _WatchedHTTPPool(HTTPConnectionPool):
    def _get_conn(self, timeout: float | None = None) -> BaseHTTPConnection:
        return _attach(super()._get_conn(timeout))

    def _put_conn(self, conn: BaseHTTPConnection | None) -> None:
        _detach(conn)
        super()._put_conn(conn)


class _WatchedHTTPSPool(HTTPSConnectionPool):
    def _get_conn(self, timeout: float | None = None) -> BaseHTTPConnection:
        return _attach(super()._get_conn(timeout))

    def _put_conn(self, conn: BaseHTTPConnection | None) -> None:
        _detach(conn)
        super()._put_conn(conn)


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


class _DeadlinePassed(Exception):
    """Internal: the exchange's deadline passed between two reads."""


class _TooLarge(Exception):
    """Internal: the body is longer than the cap; the rest is left unread."""


@dataclass(frozen=True)
class _Answer:
    """Status, headers and body of one exchange. ``problem`` says why the body is unusable
    (longer than the cap, or not decodable); only an answer that needs its body fails on it."""

    status_code: int
    headers: Mapping[str, str]
    body: bytes
    problem: str | None = None


# --- the client ---------------------------------------------------------------------------


class MicroserviceClient:
    """Calls the microservice over one pooled HTTP session; never retries.

    Every method either returns a validated answer or raises a ``MicroserviceError`` subclass
    whose message is one line. ``timeout_s`` bounds each read, ``connect_timeout_s`` (default:
    ``timeout_s``) the connection set-up and ``deadline_s`` (default: 3x ``timeout_s``, at most
    30 s unless ``timeout_s`` is longer) the whole exchange, body included. A body longer than
    ``max_response_bytes`` once decoded is refused after reading about that much; a line
    quantity above ``max_line_quantity`` breaks the contract. A ``session`` passed in is used as
    is and left open by ``close()``; the caller owns it, and its reads are bounded by the
    deadline only between chunks (the client's own session also interrupts a blocked read).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 5.0,
        connect_timeout_s: float | None = None,
        deadline_s: float | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_line_quantity: int = DEFAULT_MAX_LINE_QUANTITY,
        session: requests.Session | None = None,
        pool_maxsize: int = 10,
    ) -> None:
        self._base_url = _checked_base_url(base_url)
        read_timeout = _checked_timeout("timeout_s", timeout_s)
        connect_timeout = (
            read_timeout
            if connect_timeout_s is None
            else _checked_timeout("connect_timeout_s", connect_timeout_s)
        )
        self._timeout = (connect_timeout, read_timeout)
        self._deadline_s = (
            max(read_timeout, min(3 * read_timeout, DEFAULT_DEADLINE_CAP_S))
            if deadline_s is None
            else _checked_timeout("deadline_s", deadline_s)
        )
        self._max_response_bytes = _checked_count(
            "max_response_bytes", max_response_bytes, 1, 2**40
        )
        self._max_line_quantity = _checked_count(
            "max_line_quantity", max_line_quantity, 1, MAX_LINE_QUANTITY_LIMIT
        )
        self._owns_session = session is None
        self._session = (
            session if session is not None else _pooled_session(pool_maxsize, self._base_url)
        )

    @property
    def base_url(self) -> str:
        """The base URL without a trailing slash."""
        return self._base_url

    @property
    def deadline_s(self) -> float:
        """The time one whole exchange (connect, headers, body) may take."""
        return self._deadline_s

    def get_order(self, order_id: str) -> MicroserviceOrder:
        """GET /v1/orders/{order_id}: the validated order, or OrderNotFound / ContractViolation."""
        _require_text("order_id", order_id)
        path = f"/v1/orders/{_path_segment(order_id)}"
        answer = self._exchange("GET", path)
        if answer.status_code == 404:
            raise OrderNotFound(order_id)
        if answer.status_code != 200:
            _raise_for_status("GET", path, answer)
        if answer.problem is not None:
            raise ContractViolation(f"{_CONTRACT_BROKEN}: {answer.problem}", status_code=200)
        order = _parse_order(answer.body, self._max_line_quantity)
        if order.id != order_id:
            raise ContractViolation(
                f"{_CONTRACT_BROKEN}: id: asked for order {order_id!r}, got {order.id!r}",
                status_code=200,
            )
        return order

    def set_fulfillment_status(
        self, order_id: str, *, status: str, expected_revision: Revision, idempotency_key: str
    ) -> None:
        """PUT /v1/orders/{order_id}/fulfillment; a replay with the same key has no second effect.

        ``expected_revision`` is sent exactly as the order carried it (a string stays a string,
        an integer an integer). Raises RevisionConflict on a 409 revision conflict (reload the
        order, then send its revision under a new key), IdempotencyKeyInFlight on a 409 while
        the key's first request is still being handled (send the same key and body later),
        IdempotencyKeyReused on a 422 for a key bound to another body.
        """
        _require_text("order_id", order_id)
        _require_text("status", status)
        _require_text("idempotency_key", idempotency_key)
        problem = revision_problem(expected_revision)
        if problem is not None:
            raise InvalidInput(f"expected_revision {problem}: {expected_revision!r}")
        path = f"/v1/orders/{_path_segment(order_id)}/fulfillment"
        answer = self._exchange(
            "PUT",
            path,
            headers={"Idempotency-Key": idempotency_key},
            json_body={"status": status, "expected_revision": expected_revision},
        )
        if answer.status_code not in (200, 204):
            _raise_for_status("PUT", path, answer)

    def close(self) -> None:
        """Close the pooled connections, unless the session was passed in by the caller."""
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _exchange(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
    ) -> _Answer:
        """One HTTP exchange within the deadline, its body read up to the size cap."""
        watchdog = _WATCHDOG if self._owns_session else None  # see _DeadlineAdapter
        deadline = _Deadline(self._deadline_s, watchdog=watchdog)
        _ACTIVE.deadline = deadline
        try:
            with self._transport_errors(method, path, deadline):
                # no redirects: requests would turn a redirected PUT into a GET
                response = self._session.request(
                    method,
                    self._base_url + path,
                    headers=headers,
                    json=json_body,
                    timeout=self._timeouts_within(deadline),
                    allow_redirects=False,
                    stream=True,
                )
                try:
                    return self._read_answer(response, deadline)
                finally:
                    deadline.finish()  # before the connection can serve another exchange
                    response.close()  # back to the pool, or closed when not read to the end
        finally:
            deadline.finish()
            _ACTIVE.deadline = None

    def _timeouts_within(self, deadline: _Deadline) -> tuple[float, float]:
        remaining = deadline.remaining()
        if remaining <= 0:
            raise _DeadlinePassed
        connect, read = self._timeout
        return min(connect, remaining), min(read, remaining)

    def _read_answer(self, response: requests.Response, deadline: _Deadline) -> _Answer:
        if deadline.passed():
            raise _DeadlinePassed
        status, headers = response.status_code, response.headers
        try:
            body = _read_capped(response, self._max_response_bytes, deadline)
        except _TooLarge:
            return _Answer(
                status, headers, b"", f"response larger than {self._max_response_bytes} bytes"
            )
        except requests.exceptions.ContentDecodingError as exc:
            if deadline.passed():
                raise _DeadlinePassed from exc
            return _Answer(status, headers, b"", f"body cannot be decoded: {_one_line(str(exc))}")
        if deadline.passed():
            raise _DeadlinePassed
        return _Answer(status, headers, body)

    @contextmanager
    def _transport_errors(self, method: str, path: str, deadline: _Deadline) -> Iterator[None]:
        """Transport failures become Microservice{Timeout,Unavailable}; any of them after the
        deadline is a timeout."""
        try:
            yield
        except _DeadlinePassed as exc:
            raise self._deadline_timeout(method, path) from exc
        except requests.Timeout as exc:  # before ConnectionError: ConnectTimeout is both
            raise MicroserviceTimeout(
                f"{method} {path}: no answer within {_describe_timeout(self._timeout)}"
            ) from exc
        except requests.ConnectionError as exc:
            if deadline.passed():
                raise self._deadline_timeout(method, path) from exc
            # requests reports a read timeout hit while reading the body as a ConnectionError
            if exc.args and isinstance(exc.args[0], ReadTimeoutError):
                raise MicroserviceTimeout(
                    f"{method} {path}: answer body not read within "
                    f"{_describe_timeout(self._timeout)}"
                ) from exc
            raise MicroserviceUnavailable(
                f"{method} {path}: connection failed: {_one_line(str(exc))}"
            ) from exc
        except (requests.RequestException, Urllib3Error, HTTPException, OSError) as exc:
            # e.g. a connection dropped mid-body, or shut down by the deadline's watch
            if deadline.passed():
                raise self._deadline_timeout(method, path) from exc
            raise MicroserviceUnavailable(
                f"{method} {path}: {type(exc).__name__}: {_one_line(str(exc))}"
            ) from exc

    def _deadline_timeout(self, method: str, path: str) -> MicroserviceTimeout:
        return MicroserviceTimeout(
            f"{method} {path}: exchange not finished within its {self._deadline_s:g}s deadline"
        )


def _read_capped(response: requests.Response, limit: int, deadline: _Deadline) -> bytes:
    """The decoded body, read in chunks; _TooLarge as soon as it is longer than ``limit``."""
    declared = _declared_length(response)
    if declared is not None and declared > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(_CHUNK_BYTES):
        if deadline.passed():
            raise _DeadlinePassed
        size += len(chunk)
        if size > limit:
            raise _TooLarge
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


def _pooled_session(pool_maxsize: int, base_url: str) -> requests.Session:
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


def _checked_base_url(base_url: str) -> str:
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise InvalidInput(f"base_url must be an http(s) URL, got {base_url!r}")
    return base_url.rstrip("/")


def _checked_timeout(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise InvalidInput(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _checked_count(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def _require_text(name: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{name} must be a non-empty string, got {value!r}")


def _path_segment(value: str) -> str:
    """``value`` as one percent-encoded path segment. A "." or ".." segment is encoded further,
    or URL normalisation would remove it (GET /v1/orders/.. would ask for /v1/); requests
    decodes it back after that step, so it is sent as the literal segment."""
    segment = quote(value, safe="")
    return segment.replace(".", "%2E") if segment in (".", "..") else segment


def _describe_timeout(timeout: tuple[float, float]) -> str:
    connect, read = timeout
    return f"{read:g}s (connect {connect:g}s)"


def _parse_order(body: bytes, max_line_quantity: int) -> MicroserviceOrder:
    """Validate a 200 body against the contract; the error names the offending field."""
    data = _decode_json(body)
    try:
        return MicroserviceOrder.model_validate(
            data, context={"max_line_quantity": max_line_quantity}
        )
    except ValidationError as exc:
        raise ContractViolation(_describe_validation_error(exc), status_code=200) from exc


def _decode_json(body: bytes) -> object:
    """The JSON value of a UTF-8 body (standard JSON only: no NaN or Infinity)."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 at byte {exc.start}"
    except RecursionError:
        problem = "nested too deeply"
    except ValueError as exc:
        problem = str(exc)
    raise ContractViolation(
        f"microservice response is not valid JSON: {_one_line(problem)}", status_code=200
    )


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


def _describe_validation_error(exc: ValidationError) -> str:
    problems = [
        f"{'.'.join(str(part) for part in error['loc']) or '(body)'}: {error['msg']}"
        for error in exc.errors(include_url=False)
    ]
    return _one_line(f"{_CONTRACT_BROKEN}: {'; '.join(problems)}", limit=_MAX_CONTRACT_CHARS)


def _raise_for_status(method: str, path: str, answer: _Answer) -> NoReturn:
    """Map a status the caller did not expect to the matching error class."""
    status = answer.status_code
    message = f"{method} {path}: HTTP {status}{_error_detail(answer.body)}"
    if status == 429:
        raise MicroserviceRateLimited(message, retry_after_s=_retry_after_s(answer.headers))
    if status >= 500:
        raise MicroserviceServerError(
            message, status_code=status, retry_after_s=_retry_after_s(answer.headers)
        )
    code = _error_code(answer.body)
    if status == 409 and code == IDEMPOTENCY_KEY_IN_FLIGHT:
        raise IdempotencyKeyInFlight(message, status_code=status)
    if status == 409:
        raise RevisionConflict(message, status_code=status)
    if status == 422 and code == IDEMPOTENCY_KEY_REUSED:
        raise IdempotencyKeyReused(message, status_code=status)
    if 400 <= status < 500:
        raise UnprocessableRequest(message, status_code=status)
    # 1xx/2xx/3xx where the contract promises something else
    raise ContractViolation(f"{_CONTRACT_BROKEN}: unexpected {message}", status_code=status)


def _error_code(body: bytes) -> str | None:
    """The ``error.code`` of a contract error body, or None."""
    try:
        parsed = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _error_detail(body: bytes) -> str:
    """': CODE: message' from a contract error body, or '' when there is none."""
    try:
        parsed = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deeply, cut short
        return ""
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return ""
    parts = [
        str(error[key])
        for key in ("code", "message")
        if isinstance(error.get(key), str | int) and error[key] != ""
    ]
    return _one_line(": " + ": ".join(parts)) if parts else ""


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds; None when absent or not a non-negative number of seconds."""
    raw = headers.get("Retry-After")
    if raw is None:
        return None
    try:
        seconds = float(raw.strip())
    except ValueError:  # an HTTP-date or garbage: the task's own backoff applies
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _one_line(text: str, *, limit: int = _MAX_DETAIL_CHARS) -> str:
    """Collapse whitespace so a message stays on one log line, escape what cannot be printed
    (control and format characters, lone surrogates) and cap its length."""
    flat = "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in " ".join(text.split())
    )
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."

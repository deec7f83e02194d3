"""HTTP client for the Allegro microservice contract (see DESIGN.md, "The microservice contract").

Every outcome that is not a usable answer becomes one error of ``stock_sync.domain.errors``:
transient ones (network, timeout, 429, 5xx, 404 on GET, 409) carry ``retryable = True`` and the
Celery tasks retry them; permanent ones (422, other 4xx, a broken answer) do not. The client never
retries by itself, so the retry budget and its logging stay in one place, the tasks.

An answer is checked against the contract models of ``marketplace_contract``; the body is read
streamed up to ``max_response_bytes`` (decoded) and the whole exchange has to finish within
``deadline_s`` (``deadline_session``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from http.client import HTTPException
from typing import Any, Self
from urllib.parse import quote

import requests
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from stock_sync.adapters.deadline_session import (
    Deadline,
    DeadlinePassed,
    TooLarge,
    bounded_exchange,
    pooled_session,
    read_capped,
)
from stock_sync.adapters.marketplace_contract import (
    CONTRACT_BROKEN,
    DEFAULT_MAX_LINE_QUANTITY,
    MAX_LINE_QUANTITY_LIMIT,
    Answer,
    MicroserviceOrder,
    detail_line,
    parse_order,
    raise_for_status,
    revision_problem,
)
from stock_sync.domain.errors import (
    ContractViolation,
    InvalidInput,
    MicroserviceTimeout,
    MicroserviceUnavailable,
    OrderNotFound,
)
from stock_sync.domain.revisions import Revision

DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024
DEFAULT_DEADLINE_CAP_S = 30.0  # a default deadline is 3x the read timeout, at most this


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
            session if session is not None else pooled_session(pool_maxsize, self._base_url)
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
            raise_for_status("GET", path, answer)
        if answer.problem is not None:
            raise ContractViolation(f"{CONTRACT_BROKEN}: {answer.problem}", status_code=200)
        order = parse_order(answer.body, self._max_line_quantity)
        if order.id != order_id:
            raise ContractViolation(
                f"{CONTRACT_BROKEN}: id: asked for order {order_id!r}, got {order.id!r}",
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
            raise_for_status("PUT", path, answer)

    def close(self) -> None:
        """Close the pooled connections, unless the session was passed in by the caller."""
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _exchange(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
    ) -> Answer:
        """One HTTP exchange within the deadline, its body read up to the size cap."""
        # only the client's own session has the pools that let the watchdog interrupt a read
        with (
            bounded_exchange(self._deadline_s, watched=self._owns_session) as deadline,
            self._transport_errors(method, path, deadline),
        ):
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

    def _timeouts_within(self, deadline: Deadline) -> tuple[float, float]:
        remaining = deadline.remaining()
        if remaining <= 0:
            raise DeadlinePassed
        connect, read = self._timeout
        return min(connect, remaining), min(read, remaining)

    def _read_answer(self, response: requests.Response, deadline: Deadline) -> Answer:
        if deadline.passed():
            raise DeadlinePassed
        status, headers = response.status_code, response.headers
        try:
            body = read_capped(response, self._max_response_bytes, deadline)
        except TooLarge:
            return Answer(
                status, headers, b"", f"response larger than {self._max_response_bytes} bytes"
            )
        except requests.exceptions.ContentDecodingError as exc:
            if deadline.passed():
                raise DeadlinePassed from exc
            return Answer(status, headers, b"", f"body cannot be decoded: {detail_line(str(exc))}")
        if deadline.passed():
            raise DeadlinePassed
        return Answer(status, headers, body)

    @contextmanager
    def _transport_errors(self, method: str, path: str, deadline: Deadline) -> Iterator[None]:
        """Transport failures become Microservice{Timeout,Unavailable}; any of them after the
        deadline is a timeout."""
        try:
            yield
        except DeadlinePassed as exc:
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
                f"{method} {path}: connection failed: {detail_line(str(exc))}"
            ) from exc
        except (requests.RequestException, Urllib3Error, HTTPException, OSError) as exc:
            # e.g. a connection dropped mid-body, or shut down by the deadline's watch
            if deadline.passed():
                raise self._deadline_timeout(method, path) from exc
            raise MicroserviceUnavailable(
                f"{method} {path}: {type(exc).__name__}: {detail_line(str(exc))}"
            ) from exc

    def _deadline_timeout(self, method: str, path: str) -> MicroserviceTimeout:
        return MicroserviceTimeout(
            f"{method} {path}: exchange not finished within its {self._deadline_s:g}s deadline"
        )


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

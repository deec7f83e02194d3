"""HTTP client for the Allegro microservice contract (see DESIGN.md, "The microservice contract").

Every outcome that is not a usable answer becomes one error of ``stock_sync.domain.errors``:
transient ones (network, timeout, 429, 5xx, 404 on GET, 409) carry ``retryable = True`` and the
Celery tasks retry them; permanent ones (422, other 4xx, a broken answer) do not. The client never
retries by itself, so the retry budget and its logging stay in one place, the tasks.
"""

from __future__ import annotations

import json
import math
from types import TracebackType
from typing import Any, Literal, NoReturn, Self
from urllib.parse import quote

import requests
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ReadTimeoutError

from stock_sync.domain.errors import (
    ContractViolation,
    InvalidInput,
    MicroserviceRateLimited,
    MicroserviceServerError,
    MicroserviceTimeout,
    MicroserviceUnavailable,
    OrderNotFound,
    RevisionConflict,
    UnprocessableRequest,
)

OrderStatus = Literal["BOUGHT", "FILLED_IN", "READY_FOR_PROCESSING", "CANCELLED"]

_CONTRACT_BROKEN = "microservice response breaks the contract"
_MAX_DETAIL_CHARS = 200
_MAX_CONTRACT_CHARS = 600


class OrderLineItem(BaseModel):
    """One line of a marketplace order: ``quantity`` units of the warehouse item ``sku``."""

    # strict: a contract answer with "2" for a quantity is a bug upstream, not something to guess
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    id: str
    offer_id: str
    sku: str = Field(min_length=1)
    quantity: int = Field(ge=1)


class MicroserviceOrder(BaseModel):
    """An order as the microservice reports it; ``revision`` guards the fulfillment update."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    id: str
    account_name: str | None
    revision: int
    status: OrderStatus
    fulfillment_status: str
    line_items: list[OrderLineItem]


class MicroserviceClient:
    """Calls the microservice over one pooled HTTP session; never retries.

    Every method either returns a validated answer or raises a ``MicroserviceError`` subclass
    whose message is one line. ``timeout_s`` bounds each read, ``connect_timeout_s`` (default:
    ``timeout_s``) the connection set-up. A ``session`` passed in is used as is and left open
    by ``close()``; the caller owns it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 5.0,
        connect_timeout_s: float | None = None,
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
        self._owns_session = session is None
        self._session = session if session is not None else _pooled_session(pool_maxsize)

    @property
    def base_url(self) -> str:
        """The base URL without a trailing slash."""
        return self._base_url

    def get_order(self, order_id: str) -> MicroserviceOrder:
        """GET /v1/orders/{order_id}: the validated order, or OrderNotFound / ContractViolation."""
        _require_text("order_id", order_id)
        path = f"/v1/orders/{quote(order_id, safe='')}"
        response = self._send("GET", path)
        if response.status_code == 404:
            raise OrderNotFound(order_id)
        if response.status_code != 200:
            _raise_for_status("GET", path, response)
        order = _parse_order(response.content)
        if order.id != order_id:
            raise ContractViolation(
                f"{_CONTRACT_BROKEN}: id: asked for order {order_id!r}, got {order.id!r}",
                status_code=response.status_code,
            )
        return order

    def set_fulfillment_status(
        self, order_id: str, *, status: str, expected_revision: int, idempotency_key: str
    ) -> None:
        """PUT /v1/orders/{order_id}/fulfillment; a replay with the same key has no second effect.

        Raises RevisionConflict on 409 (reload the order, then retry with its revision).
        """
        _require_text("order_id", order_id)
        _require_text("status", status)
        _require_text("idempotency_key", idempotency_key)
        if isinstance(expected_revision, bool) or not isinstance(expected_revision, int):
            raise InvalidInput(f"expected_revision must be an integer, got {expected_revision!r}")
        path = f"/v1/orders/{quote(order_id, safe='')}/fulfillment"
        response = self._send(
            "PUT",
            path,
            headers={"Idempotency-Key": idempotency_key},
            json_body={"status": status, "expected_revision": expected_revision},
        )
        if response.status_code not in (200, 204):
            _raise_for_status("PUT", path, response)

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

    def _send(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
    ) -> requests.Response:
        """One HTTP exchange; transport failures become Microservice{Timeout,Unavailable}."""
        try:
            # no redirects: requests would turn a redirected PUT into a GET
            return self._session.request(
                method,
                self._base_url + path,
                headers=headers,
                json=json_body,
                timeout=self._timeout,
                allow_redirects=False,
            )
        except requests.Timeout as exc:  # before ConnectionError: ConnectTimeout is both
            raise MicroserviceTimeout(
                f"{method} {path}: no answer within {_describe_timeout(self._timeout)}"
            ) from exc
        except requests.ConnectionError as exc:
            # requests reports a read timeout hit while reading the body as a ConnectionError
            if exc.args and isinstance(exc.args[0], ReadTimeoutError):
                raise MicroserviceTimeout(
                    f"{method} {path}: answer body not read within "
                    f"{_describe_timeout(self._timeout)}"
                ) from exc
            raise MicroserviceUnavailable(
                f"{method} {path}: connection failed: {_one_line(str(exc))}"
            ) from exc
        except requests.RequestException as exc:  # e.g. a connection dropped mid-body
            raise MicroserviceUnavailable(
                f"{method} {path}: {type(exc).__name__}: {_one_line(str(exc))}"
            ) from exc


def _pooled_session(pool_maxsize: int) -> requests.Session:
    """A session whose adapters keep up to ``pool_maxsize`` connections and never retry."""
    if pool_maxsize < 1:
        raise InvalidInput(f"pool_maxsize must be >= 1, got {pool_maxsize}")
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_maxsize, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"Accept": "application/json", "User-Agent": "stock-sync"})
    return session


def _checked_base_url(base_url: str) -> str:
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise InvalidInput(f"base_url must be an http(s) URL, got {base_url!r}")
    return base_url.rstrip("/")


def _checked_timeout(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidInput(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _require_text(name: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{name} must be a non-empty string, got {value!r}")


def _describe_timeout(timeout: tuple[float, float]) -> str:
    connect, read = timeout
    return f"{read:g}s (connect {connect:g}s)"


def _parse_order(content: bytes) -> MicroserviceOrder:
    """Validate a 200 body against the contract; the error names the offending field."""
    try:
        return MicroserviceOrder.model_validate_json(content)
    except ValidationError as exc:
        raise ContractViolation(_describe_validation_error(exc), status_code=200) from exc


def _describe_validation_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    if any(error["type"] == "json_invalid" for error in errors):
        return f"microservice response is not valid JSON: {_one_line(errors[0]['msg'])}"
    problems = [
        f"{'.'.join(str(part) for part in error['loc']) or '(body)'}: {error['msg']}"
        for error in errors
    ]
    return _one_line(f"{_CONTRACT_BROKEN}: {'; '.join(problems)}", limit=_MAX_CONTRACT_CHARS)


def _raise_for_status(method: str, path: str, response: requests.Response) -> NoReturn:
    """Map a status the caller did not expect to the matching error class."""
    status = response.status_code
    message = f"{method} {path}: HTTP {status}{_error_detail(response)}"
    if status == 429:
        raise MicroserviceRateLimited(message, retry_after_s=_retry_after_s(response))
    if status >= 500:
        raise MicroserviceServerError(
            message, status_code=status, retry_after_s=_retry_after_s(response)
        )
    if status == 409:
        raise RevisionConflict(message, status_code=status)
    if 400 <= status < 500:
        raise UnprocessableRequest(message, status_code=status)
    # 1xx/2xx/3xx where the contract promises something else
    raise ContractViolation(f"{_CONTRACT_BROKEN}: unexpected {message}", status_code=status)


def _error_detail(response: requests.Response) -> str:
    """': CODE: message' from a contract error body, or '' when there is none."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return ""
    parts = [str(error[key]) for key in ("code", "message") if error.get(key)]
    return _one_line(": " + ": ".join(parts)) if parts else ""


def _retry_after_s(response: requests.Response) -> float | None:
    """Retry-After in seconds; None when absent or not a non-negative number of seconds."""
    raw = response.headers.get("Retry-After")
    if raw is None:
        return None
    try:
        seconds = float(raw.strip())
    except ValueError:  # an HTTP-date or garbage: the task's own backoff applies
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _one_line(text: str, *, limit: int = _MAX_DETAIL_CHARS) -> str:
    """Collapse whitespace so a message stays on one log line; cap its length."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."

"""An in-memory fake of the Allegro microservice contract, served over real HTTP.

Used by the integration tests, the embedded demo and the benchmarks. It speaks the contract of
DESIGN.md ("The microservice contract") and adds fault knobs and an admin API.

Contract endpoints (faults apply to these only):

- ``GET /v1/orders/{id}`` -> 200 order, or 404 ``ORDER_NOT_FOUND``.
- ``PUT /v1/orders/{id}/fulfillment`` with ``Idempotency-Key`` and ``{"status",
  "expected_revision"}`` -> 204; a replay of an applied key -> 204 with no second effect; a wrong
  revision -> 409 ``REVISION_CONFLICT``; no key or a bad body -> 422. What else a key means
  depends on the mode.

Modes (``strict``; the default is ``DEFAULT_STRICT``, followed by the constructor, ``serve``
and the ``--strict/--lenient`` option of the command; ``set_strict`` and ``/_admin/mode`` change
it, ``reset`` restores the constructor's). They differ in two rules only:

- Strict, as Allegro and the IETF idempotency-key draft behave (DESIGN.md, "What the contract
  does not promise"):
  - The revision moves only when the order changes. A PUT that sets the fulfillment status the
    order already has answers 204 (its key counts as applied) and moves nothing.
  - An Idempotency-Key is bound, on arrival, to the first request sent with it (order id,
    status and expected_revision, the revision's type included), whatever that request's
    answer (204, 409, 422, 503, an injected fault, a 404). The same key with another request
    -> 422 ``IDEMPOTENCY_KEY_REUSED`` (not retryable); with the same request while the first
    one is in flight -> 409 ``IDEMPOTENCY_KEY_IN_FLIGHT`` (retryable); once the first was
    applied -> 204, no second effect (outcome ``replayed``); once it was refused (409, 503,
    ...) -> handled again as a new request. A request is in flight from its arrival until it
    is applied or refused: while it sleeps on a global fault (``latency_s``, ``timeout_s``),
    waits at the ``hold_puts`` gate or in a timed hold (``hold_puts_s``, ``hold_rate``); the
    delays and losses of its answer (``put_latency_s``, late, failed or dropped answers) come
    after. The key check comes before the injected faults: a refused request gets only their
    delay.
- Lenient (the kinder behaviour the fake had first): every applied PUT moves the revision, even
  when it leaves the status as it was; only applied keys are remembered (replayed with 204,
  whatever their body, on any order), so a key refused with 409/422/503 may be sent again with
  another body, and two requests with one key may be in flight together (the first to apply
  wins, the other is replayed).

Everything else works the same in both modes. The buyer and the seller touch an order only when
asked: by a helper (``cancel_order``, ``buyer_edit``, ``set_fulfillment_status``), a per-order
knob or a global rate. Besides a PUT that changes the status, these move the revision: a buyer's
edit (nothing else changes), a buyer's cancellation (status CANCELLED, fulfillment unchanged), the
readiness flip of ``ready_after_reads`` and a fulfillment change made with
``set_fulfillment_status`` (``POST /_admin/orders/{id}/fulfillment``, when the status changes).

Revisions (``revision_form``): ``"string"`` (the default, Allegro's way) serves an opaque token,
the first 8 hex digits of sha1 over the order id, how many times the id was added and a counter
that moves at each modification, so it can only be compared for equality; ``"integer"`` (some
wrappers) serves the counter itself. An order added with an integer ``revision`` starts its
counter there; in string form an order may also be added with a string ``revision``, served as
given until its next modification (so ``add_order(fake.order(id))`` keeps the revision). A PUT
applies only when its ``expected_revision`` equals the served one, type included (``"1"`` is not
``1``): otherwise 409; a revision that is neither a string nor an integer is a 422.

Per-order knobs (``ORDER_KNOBS``; given with the order, as keyword arguments or extra keys):

- ``ready_after_reads``: the first N answered GETs show BOUGHT, later ones READY_FOR_PROCESSING.
- ``not_found_reads``: the first N GETs answer 404.
- ``fail_gets`` / ``fail_puts``: the next N GETs / PUTs answer 503 (retryable).
- ``malformed``: ``"json"`` (GET answers invalid JSON) or ``"contract"`` (a line with quantity 0).
- ``put_latency_s``: an applied PUT sleeps this long after taking effect, before answering.
- ``fail_puts_after_apply``: the next N PUTs take effect, then answer 502 (a gateway that lost
  the backend's answer).
- ``drop_puts_after_apply``: the next N PUTs take effect, then the connection is closed with no
  answer (a reset after sending).
- ``hold_puts``: the next N PUTs wait at a gate, before taking effect, until
  ``release_puts(order_id)`` (``POST /_admin/orders/{id}/release``): a PUT that lands late,
  after its sender gave up. ``held_puts(order_id)`` counts those waiting.
- ``hold_puts_s``: every PUT of the order waits this many seconds before taking effect (after
  the gate, if any), in flight all along: a proxy or a queue that held it.
- ``hold_get_answers``: the next N GETs read the order, then wait at a gate before answering
  what they read, until ``release_get_answers(order_id)`` (``POST
  /_admin/orders/{id}/release_gets``), so an older read can answer after a newer one.
  ``held_get_answers(order_id)`` counts those waiting.
- ``edit_after_reads``: right after the Nth answered GET (once), the buyer edits the order.
- ``cancel_after_reads``: right after the Nth answered GET (once), the buyer cancels the order.
- ``trickle_s``: GET answers send their headers at once, then the body one byte every
  ``trickle_s`` seconds (each byte beats a read timeout, the whole body does not).
- ``gzip_bomb_bytes``: GET answers 200 with ``Content-Encoding: gzip`` and a body that inflates
  to this many zero bytes (a 50 MB bomb is about 50 KB on the wire).

"Answered GET" means a 200 (not a 404/503 knob, nor a global fault); a buyer's change right
after it is not in that answer. ``puts_in_flight(order_id)`` counts the order's PUTs that have
arrived and are neither applied nor refused yet: tests poll it (and ``held_puts``,
``held_get_answers``) to place a request while another waits.

Global faults (``FAULT_KNOBS``, ``set_faults``): ``error_rate`` (share answered 503),
``latency_s`` (added to every request), ``timeout_rate`` + ``timeout_s`` (share that sleeps
``timeout_s`` before being handled, so a PUT lands after its sender gave up),
``rate_limit_rate`` + ``retry_after_s`` (share answered 429 with ``Retry-After``;
``retry_after_s=None`` sends none), ``late_answer_rate`` + ``late_answer_s`` (share of applied
PUTs answered only ``late_answer_s`` after taking effect), ``hold_rate`` + ``hold_s`` (share of
PUTs, past the faults above, held ``hold_s`` seconds in flight before taking effect),
``buyer_edit_rate`` (share of answered GETs of a READY_FOR_PROCESSING order right after which
the buyer edits it), ``buyer_cancel_rate`` (share of answered GETs of a READY_FOR_PROCESSING
order still in fulfillment NEW right after which the buyer cancels it). Draws come from
``random.Random(seed)``; a rate of 0 draws nothing, so adding a knob does not shift the others.

Observability: ``fulfillment_requests()`` (``GET /_admin/fulfillments``) lists every PUT with
its outcome: ``applied``, ``replayed``, ``conflict`` (409 revision), ``key_reused`` and
``in_flight`` (strict mode), ``error`` (404, 422), ``fault`` (injected 503/429); ``changed``
(the fulfillment status changed) and ``held`` (it waited at a gate or a timed hold).
``buyer_events()`` (``GET /_admin/buyer_events``) lists the buyer's edits and cancellations:
``{order_id, kind: "edit"|"cancel", at, revision}``, the revision being the one they made.
``contract_requests()`` (``GET /_admin/requests``) counts the contract requests that reached a
route, by method (``{"GET": n, "PUT": n}``), since the fake started (``reset`` keeps them): what
a benchmark divides by its operations.

Admin API (JSON; a bad value is a 422 ``INVALID_REQUEST`` naming it): ``POST /_admin/orders``
(an order or ``{"orders": [...]}``, knobs as extra keys), ``GET /_admin/orders/{id}``, ``POST
/_admin/orders/{id}/cancel``, ``POST /_admin/orders/{id}/edit``, ``POST
/_admin/orders/{id}/fulfillment`` (``{"status": "SENT"}``), ``POST /_admin/orders/{id}/release``,
``POST /_admin/orders/{id}/release_gets``, ``GET /_admin/orders/{id}/holds`` (``{"held_puts",
"puts_in_flight", "held_get_answers"}``), ``GET|POST /_admin/faults``, ``GET|POST
/_admin/revision_form`` (``{"revision_form": "string"}``), ``GET|POST /_admin/mode``
(``{"strict": true}``), ``GET /_admin/fulfillments``, ``GET /_admin/buyer_events``, ``POST
/_admin/reset``, ``GET /_admin/requests``, ``GET /_admin/health``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import random
import re
import socket
import socketserver
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import unquote, urlsplit

from stock_sync.domain.errors import InvalidInput

ORDER_STATUSES = ("BOUGHT", "FILLED_IN", "READY_FOR_PROCESSING", "CANCELLED")
# Allegro's fulfillment statuses; a PUT with anything else is refused with 422
FULFILLMENT_STATUSES = frozenset(
    {
        "NEW",
        "PROCESSING",
        "READY_FOR_SHIPMENT",
        "READY_FOR_PICKUP",
        "SENT",
        "PICKED_UP",
        "CANCELLED",
        "SUSPENDED",
        "RETURNED",
    }
)
_ORDER_FIELDS = frozenset(
    {"id", "account_name", "revision", "status", "fulfillment_status", "line_items"}
)
_LINE_FIELDS = frozenset({"id", "offer_id", "sku", "quantity"})
_NOT_PAID = ("BOUGHT", "FILLED_IN")
# Allegro and the IETF idempotency-key draft (see the module docstring); lenient is the kinder
# behaviour the fake had first. Every entry point (constructor, serve, the command) follows this.
DEFAULT_STRICT = True
_MAX_BODY_BYTES = 10 * 1024 * 1024
_MAX_HOLD_S = 300.0
_TRUNCATED_ORDER_JSON = b'{"id": "truncated", "line_items": ['
_REVISION_MAX_CHARS = 64
_CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_MAX_BOMB_BYTES = 1024**3
_BOMB_CHUNK = b"\0" * (1024 * 1024)

MalformedMode = Literal["json", "contract"]
RevisionForm = Literal["string", "integer"]
REVISION_FORMS: tuple[RevisionForm, ...] = ("string", "integer")
Revision = str | int


@dataclass
class _OrderKnobs:
    ready_after_reads: int = 0
    not_found_reads: int = 0
    fail_gets: int = 0
    fail_puts: int = 0
    malformed: MalformedMode | None = None
    put_latency_s: float = 0.0
    fail_puts_after_apply: int = 0
    drop_puts_after_apply: int = 0
    hold_puts: int = 0
    trickle_s: float = 0.0
    gzip_bomb_bytes: int = 0
    edit_after_reads: int = 0
    cancel_after_reads: int = 0
    hold_puts_s: float = 0.0
    hold_get_answers: int = 0


@dataclass(frozen=True)
class _Faults:
    error_rate: float = 0.0
    latency_s: float = 0.0
    timeout_rate: float = 0.0
    timeout_s: float = 10.0
    rate_limit_rate: float = 0.0
    retry_after_s: float | None = 1.0
    late_answer_rate: float = 0.0
    late_answer_s: float = 10.0
    buyer_edit_rate: float = 0.0
    buyer_cancel_rate: float = 0.0
    hold_rate: float = 0.0
    hold_s: float = 10.0


ORDER_KNOBS = tuple(knob.name for knob in fields(_OrderKnobs))
FAULT_KNOBS = tuple(knob.name for knob in fields(_Faults))


@dataclass
class _StoredOrder:
    """An order's contract body without its revision, which ``counter`` (+ 1 at each change),
    ``token`` (a string revision given with the order, until its first change) and
    ``generation`` (how many times the id was added before) make up in either form."""

    body: dict[str, Any]
    knobs: _OrderKnobs
    counter: int
    token: str | None
    generation: int
    answered_reads: int = 0

    def revision(self, form: RevisionForm) -> Revision:
        if form == "integer":
            return self.counter
        if self.token is not None:
            return self.token
        seed = f"{self.body['id']}:{self.generation}:{self.counter}".encode("utf-8", "replace")
        return hashlib.sha1(seed, usedforsecurity=False).hexdigest()[:8]

    def bump(self) -> None:
        """A modification: the revision moves on, in either form."""
        self.counter += 1
        self.token = None

    def served(self, form: RevisionForm) -> dict[str, Any]:
        """A copy of the contract body, revision included."""
        body = copy.deepcopy(self.body)
        return {
            "id": body.pop("id"),
            "account_name": body.pop("account_name"),
            "revision": self.revision(form),
            **body,
        }


@dataclass(frozen=True)
class _Reply:
    """One HTTP answer; ``delay_s`` is slept (without the lock) before it is sent; ``drop``
    closes the connection instead of answering; ``trickle_s`` > 0 sends the body one byte at a
    time, this long apart."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    delay_s: float = 0.0
    drop: bool = False
    trickle_s: float = 0.0


@dataclass(frozen=True)
class _FaultDraw:
    delay_s: float
    reply: _Reply | None = None


@dataclass(frozen=True)
class _PutBody:
    status: str | None = None
    expected_revision: Revision | None = None
    problem: str | None = None

    def fingerprint(self, order_id: str) -> tuple[object, ...]:
        """What binds an Idempotency-Key in strict mode: the order and the body, the revision's
        type included ("1" is not 1)."""
        revision = self.expected_revision
        return (order_id, self.status, type(revision).__name__, revision)


@dataclass
class _KeyBinding:
    """Strict mode: an Idempotency-Key, the request it was first sent with, and whether a
    request with it is being handled now or has taken effect."""

    fingerprint: tuple[object, ...]
    in_flight: bool = False
    applied: bool = False


@dataclass(frozen=True)
class _Claim:
    """A PUT past the idempotency check, in flight until it is applied or refused."""

    order_id: str
    binding: _KeyBinding | None


@dataclass(frozen=True)
class _Refusal:
    """A PUT answered at once by the idempotency check (strict mode)."""

    reply: _Reply
    outcome: str


# --- input validation (orders, knobs, faults) ---------------------------------------------


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{name} must be an integer >= 0, got {value!r}")
    return value


def _seconds(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e6:
        raise InvalidInput(f"{name} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _rate(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidInput(f"{name} must be a number between 0 and 1, got {value!r}")
    return float(value)


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be true or false, got {value!r}")
    return value


def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{name} must be a non-empty string, got {value!r}")
    return value


def _one_of(value: object, allowed: Iterable[str], name: str) -> str:
    choices = sorted(allowed)
    if value not in choices:
        raise InvalidInput(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _revision(value: object, name: str) -> Revision:
    """An integer >= 0, or a non-empty string of at most 64 characters without control
    characters or lone surrogates."""
    if isinstance(value, str):
        if 0 < len(value) <= _REVISION_MAX_CHARS and not _CONTROL_OR_SURROGATE.search(value):
            return value
        raise InvalidInput(
            f"{name} must be a non-empty string of at most {_REVISION_MAX_CHARS} characters, "
            f"without control characters or lone surrogates, got {value!r}"
        )
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{name} must be an integer >= 0 or a string, got {value!r}")
    return value


def _revision_form(value: object, name: str = "revision_form") -> RevisionForm:
    for form in REVISION_FORMS:
        if value == form:
            return form
    raise InvalidInput(f"{name} must be one of {', '.join(REVISION_FORMS)}, got {value!r}")


def _same_revision(sent: object, served: Revision) -> bool:
    """Equality of opaque revisions: the string "1" is not the integer 1."""
    return type(sent) is type(served) and sent == served


def _reject_unknown(keys: Iterable[str], known: Iterable[str], where: str) -> None:
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise InvalidInput(f"{where}: unknown keys {', '.join(unknown)}; known: {', '.join(known)}")


def _malformed_mode(value: object, name: str) -> MalformedMode | None:
    if value is None or value == "json" or value == "contract":
        return value
    raise InvalidInput(f"{name} must be 'json', 'contract' or null, got {value!r}")


def _order_knobs(values: Mapping[str, Any], where: str) -> _OrderKnobs:
    _reject_unknown(values, ORDER_KNOBS, where)
    malformed = _malformed_mode(values.get("malformed"), f"{where}: malformed")
    return _OrderKnobs(
        ready_after_reads=_count(values.get("ready_after_reads", 0), f"{where}: ready_after_reads"),
        not_found_reads=_count(values.get("not_found_reads", 0), f"{where}: not_found_reads"),
        fail_gets=_count(values.get("fail_gets", 0), f"{where}: fail_gets"),
        fail_puts=_count(values.get("fail_puts", 0), f"{where}: fail_puts"),
        malformed=malformed,
        put_latency_s=_seconds(values.get("put_latency_s", 0.0), f"{where}: put_latency_s"),
        fail_puts_after_apply=_count(
            values.get("fail_puts_after_apply", 0), f"{where}: fail_puts_after_apply"
        ),
        drop_puts_after_apply=_count(
            values.get("drop_puts_after_apply", 0), f"{where}: drop_puts_after_apply"
        ),
        hold_puts=_count(values.get("hold_puts", 0), f"{where}: hold_puts"),
        trickle_s=_seconds(values.get("trickle_s", 0.0), f"{where}: trickle_s"),
        gzip_bomb_bytes=_bomb_size(values.get("gzip_bomb_bytes", 0), f"{where}: gzip_bomb_bytes"),
        edit_after_reads=_count(values.get("edit_after_reads", 0), f"{where}: edit_after_reads"),
        cancel_after_reads=_count(
            values.get("cancel_after_reads", 0), f"{where}: cancel_after_reads"
        ),
        hold_puts_s=_seconds(values.get("hold_puts_s", 0.0), f"{where}: hold_puts_s"),
        hold_get_answers=_count(values.get("hold_get_answers", 0), f"{where}: hold_get_answers"),
    )


def _bomb_size(value: object, name: str) -> int:
    size = _count(value, name)
    if size > _MAX_BOMB_BYTES:
        raise InvalidInput(f"{name} must be at most {_MAX_BOMB_BYTES}, got {size}")
    return size


def _line_item(raw: object, order_id: str, index: int) -> dict[str, Any]:
    where = f"order {order_id}: line_items.{index}"
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"{where} must be an object, got {raw!r}")
    _reject_unknown(raw, sorted(_LINE_FIELDS), where)
    sku = _text(raw.get("sku"), f"{where}.sku")
    quantity = raw.get("quantity")
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 1:
        raise InvalidInput(f"{where}.quantity must be an integer >= 1, got {quantity!r}")
    return {
        "id": _text(raw.get("id", f"{order_id}-line-{index + 1}"), f"{where}.id"),
        "offer_id": _text(raw.get("offer_id", f"offer-{sku}"), f"{where}.offer_id"),
        "sku": sku,
        "quantity": quantity,
    }


def _parse_order(raw: object, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], _OrderKnobs]:
    """A contract order body with defaults filled in, and its knobs; InvalidInput names the field.

    Defaults: revision 1 (an integer or a string), status READY_FOR_PROCESSING,
    fulfillment_status NEW, account_name null, line ids ``{order}-line-{n}``, offer ids
    ``offer-{sku}``.
    """
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"an order must be a JSON object, got {type(raw).__name__}")
    order_id = _text(raw.get("id"), "order id")
    where = f"order {order_id}"
    _reject_unknown(raw, sorted(_ORDER_FIELDS | set(ORDER_KNOBS)), where)
    knobs = _order_knobs({**{k: raw[k] for k in ORDER_KNOBS if k in raw}, **overrides}, where)
    account_name = raw.get("account_name")
    if account_name is not None:
        _text(account_name, f"{where}: account_name")
    line_items = raw.get("line_items")
    if not isinstance(line_items, list):
        raise InvalidInput(f"{where}: line_items must be a list, got {line_items!r}")
    status = _one_of(raw.get("status", "READY_FOR_PROCESSING"), ORDER_STATUSES, f"{where}: status")
    if knobs.ready_after_reads and status == "READY_FOR_PROCESSING":
        status = "BOUGHT"  # it becomes ready once the reads have happened
    body = {
        "id": order_id,
        "account_name": account_name,
        "revision": _revision(raw.get("revision", 1), f"{where}: revision"),
        "status": status,
        "fulfillment_status": _one_of(
            raw.get("fulfillment_status", "NEW"),
            FULFILLMENT_STATUSES,
            f"{where}: fulfillment_status",
        ),
        "line_items": [_line_item(line, order_id, i) for i, line in enumerate(line_items)],
    }
    return body, knobs


def _updated_faults(current: _Faults, changes: Mapping[str, Any]) -> _Faults:
    _reject_unknown(changes, FAULT_KNOBS, "faults")
    checked: dict[str, Any] = {}
    for name, value in changes.items():
        if name.endswith("_rate"):
            checked[name] = _rate(value, f"faults: {name}")
        elif name == "retry_after_s" and value is None:
            checked[name] = None
        else:
            checked[name] = _seconds(value, f"faults: {name}")
    return replace(current, **checked)


def _parse_put_body(raw: bytes) -> _PutBody:
    """The PUT body's fields, with ``problem`` set when it breaks the contract."""
    try:
        body = json.loads(raw)
    except ValueError:
        return _PutBody(problem="body is not valid JSON")
    if not isinstance(body, dict):
        return _PutBody(problem="body must be a JSON object")
    status, revision = body.get("status"), body.get("expected_revision")
    recorded = _PutBody(
        status=status if isinstance(status, str) else None,
        expected_revision=revision
        if isinstance(revision, str | int) and not isinstance(revision, bool)
        else None,
    )
    if recorded.status not in FULFILLMENT_STATUSES:
        return replace(recorded, problem=f"status must be a fulfillment status, got {status!r}")
    if recorded.expected_revision is None:
        problem = f"expected_revision must be a string or an integer, got {revision!r}"
        return replace(recorded, problem=problem)
    return recorded


def load_orders_file(path: str) -> list[dict[str, Any]]:
    """The orders of a JSON file (a list, or ``{"orders": [...]}``), each checked.

    Raises InvalidInput with a one-line message naming the file and the problem.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as exc:
        raise InvalidInput(f"orders file {path}: cannot read it: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise InvalidInput(f"orders file {path}: not valid JSON: {exc}") from exc
    orders = data.get("orders") if isinstance(data, dict) else data
    if not isinstance(orders, list):
        raise InvalidInput(
            f'orders file {path}: expected a JSON list of orders or {{"orders": [...]}}'
        )
    try:
        for order in orders:
            _parse_order(order, {})
    except InvalidInput as exc:
        raise InvalidInput(f"orders file {path}: {exc}") from exc
    return orders


# --- answers --------------------------------------------------------------------------------


def _json_reply(status: int, payload: object, **extra: Any) -> _Reply:
    return _Reply(status, json.dumps(payload, separators=(",", ":")).encode(), **extra)


def _error_reply(
    status: int, code: str, message: str, *, retryable: bool = False, **extra: Any
) -> _Reply:
    error = {"code": code, "message": message, "retryable": retryable}
    return _json_reply(status, {"error": error}, **extra)


def _not_found(order_id: str) -> _Reply:
    return _error_reply(404, "ORDER_NOT_FOUND", f"order {order_id} not found")


def _unavailable(reason: str) -> _Reply:
    return _error_reply(503, "SERVICE_UNAVAILABLE", reason, retryable=True)


def _rate_limited(retry_after_s: float | None) -> _Reply:
    headers = () if retry_after_s is None else (("Retry-After", f"{retry_after_s:g}"),)
    return _error_reply(429, "RATE_LIMITED", "too many requests", retryable=True, headers=headers)


def _order_reply(body: dict[str, Any], knobs: _OrderKnobs) -> _Reply:
    if knobs.gzip_bomb_bytes:
        bomb = _gzipped_zeros(knobs.gzip_bomb_bytes)
        return _Reply(200, bomb, headers=(("Content-Encoding", "gzip"),))
    if knobs.malformed == "json":
        return _Reply(200, _TRUNCATED_ORDER_JSON, trickle_s=knobs.trickle_s)
    if knobs.malformed == "contract":
        lines = body["line_items"] or [{"id": "x", "offer_id": "x", "sku": "X", "quantity": 1}]
        body["line_items"] = [{**lines[0], "quantity": 0}, *lines[1:]]
    return _json_reply(200, body, trickle_s=knobs.trickle_s)


@functools.lru_cache(maxsize=4)
def _gzipped_zeros(size: int) -> bytes:
    """``size`` zero bytes, gzip-compressed a chunk at a time (never all of them in memory)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    parts = []
    for start in range(0, size, len(_BOMB_CHUNK)):
        parts.append(compressor.compress(_BOMB_CHUNK[: min(len(_BOMB_CHUNK), size - start)]))
    parts.append(compressor.flush())
    return b"".join(parts)


def _encode_response(reply: _Reply, *, close: bool) -> bytes:
    """Status line, headers and body in one buffer, so the answer leaves in one write."""
    phrase = HTTPStatus(reply.status).phrase
    head = [f"HTTP/1.1 {reply.status} {phrase}"]
    if reply.status != 204:  # a 204 carries neither a body nor a Content-Length
        head += ["Content-Type: application/json", f"Content-Length: {len(reply.body)}"]
    head += [f"{name}: {value}" for name, value in reply.headers]
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body


# --- state ------------------------------------------------------------------------------------


class _FakeState:
    """Orders, faults, recorded PUTs and Idempotency-Keys behind one lock; never sleeps while
    holding it."""

    def __init__(
        self, seed: int, revision_form: RevisionForm, *, strict: bool = DEFAULT_STRICT
    ) -> None:
        self._lock = threading.Lock()
        self._seed = seed
        self._initial_revision_form = revision_form
        self._revision_form = revision_form
        self._initial_strict = _flag(strict, "strict")
        self._strict = self._initial_strict
        self._orders: dict[str, _StoredOrder] = {}
        self._generations: dict[str, int] = {}
        self._faults = _Faults()
        self._applied_keys: dict[str, str] = {}
        self._keys: dict[str, _KeyBinding] = {}  # strict mode: every key seen
        self._fulfillments: list[dict[str, Any]] = []
        self._buyer_events: list[dict[str, Any]] = []
        self._random = random.Random(seed)
        self._gates: dict[str, threading.Event] = {}  # hold_puts
        self._get_gates: dict[str, threading.Event] = {}  # hold_get_answers
        # counts kept across reset(): the waiting threads take themselves off
        self._held: dict[str, int] = {}
        self._held_gets: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        self._requests: dict[str, int] = {}  # contract requests by method, kept across reset()

    def reset(self) -> None:
        with self._lock:
            self._orders.clear()
            self._generations.clear()
            self._revision_form = self._initial_revision_form
            self._strict = self._initial_strict
            self._faults = _Faults()
            self._applied_keys.clear()
            self._keys.clear()
            self._fulfillments.clear()
            self._buyer_events.clear()
            self._random = random.Random(self._seed)
            gates = [*self._gates.values(), *self._get_gates.values()]
            self._gates, self._get_gates = {}, {}
        for gate in gates:
            gate.set()

    def add_orders(self, raw_orders: Iterable[object], overrides: Mapping[str, Any]) -> list[str]:
        parsed = [_parse_order(raw, overrides) for raw in raw_orders]  # all or nothing
        for _, knobs in parsed:
            if knobs.gzip_bomb_bytes:  # built now, not under the lock of a GET
                _gzipped_zeros(knobs.gzip_bomb_bytes)
        with self._lock:
            if self._revision_form == "integer":
                for body, _ in parsed:
                    if isinstance(body["revision"], str):
                        raise InvalidInput(
                            f"order {body['id']}: revision must be an integer in integer "
                            f"revision form, got {body['revision']!r}"
                        )
            for body, knobs in parsed:
                self._orders[body["id"]] = self._stored(body, knobs)
        return [body["id"] for body, _ in parsed]

    def _stored(self, body: dict[str, Any], knobs: _OrderKnobs) -> _StoredOrder:
        order_id, revision = body["id"], body.pop("revision")
        generation = self._generations.get(order_id, 0)
        self._generations[order_id] = generation + 1
        if isinstance(revision, str):  # served as given until the first change
            return _StoredOrder(body, knobs, counter=0, token=revision, generation=generation)
        return _StoredOrder(body, knobs, counter=revision, token=None, generation=generation)

    def revision_form(self) -> RevisionForm:
        with self._lock:
            return self._revision_form

    def set_revision_form(self, form: object) -> RevisionForm:
        checked = _revision_form(form)
        with self._lock:
            self._revision_form = checked
            return checked

    def strict(self) -> bool:
        with self._lock:
            return self._strict

    def set_strict(self, strict: object) -> bool:
        checked = _flag(strict, "strict")
        with self._lock:
            self._strict = checked
            return checked

    def set_faults(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._faults = _updated_faults(self._faults, changes)
            return asdict(self._faults)

    def faults(self) -> dict[str, Any]:
        with self._lock:
            return asdict(self._faults)

    def order(self, order_id: str) -> dict[str, Any] | None:
        with self._lock:
            stored = self._orders.get(order_id)
            return None if stored is None else stored.served(self._revision_form)

    def cancel(self, order_id: str) -> dict[str, Any] | None:
        """The buyer cancels: status CANCELLED and a new revision (once)."""
        with self._lock:
            stored = self._orders.get(order_id)
            if stored is None:
                return None
            self._buyer_cancel(stored)
            return stored.served(self._revision_form)

    def buyer_edit(self, order_id: str) -> dict[str, Any] | None:
        """The buyer edits the order (address, delivery): only the revision moves."""
        with self._lock:
            stored = self._orders.get(order_id)
            if stored is None:
                return None
            self._buyer_edit(stored)
            return stored.served(self._revision_form)

    def set_fulfillment_status(self, order_id: str, status: object) -> dict[str, Any] | None:
        """A change made behind the product's back (the seller, another tool)."""
        checked = _one_of(status, FULFILLMENT_STATUSES, "status")
        with self._lock:
            stored = self._orders.get(order_id)
            if stored is None:
                return None
            if stored.body["fulfillment_status"] != checked:
                stored.body["fulfillment_status"] = checked
                stored.bump()
            return stored.served(self._revision_form)

    def buyer_events(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._buyer_events)

    def fulfillment_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._fulfillments)

    def order_count(self) -> int:
        with self._lock:
            return len(self._orders)

    def count_request(self, method: str) -> None:
        with self._lock:
            self._requests[method] = self._requests.get(method, 0) + 1

    def contract_requests(self) -> dict[str, int]:
        with self._lock:
            return {"GET": 0, "PUT": 0, **self._requests}

    def draw_fault(self) -> _FaultDraw:
        """The global faults for one contract request: a delay, and maybe a canned answer."""
        with self._lock:
            faults = self._faults
            if self._chance(faults.rate_limit_rate):
                return _FaultDraw(faults.latency_s, _rate_limited(faults.retry_after_s))
            if self._chance(faults.error_rate):
                return _FaultDraw(faults.latency_s, _unavailable("injected fault"))
            timeout = faults.timeout_s if self._chance(faults.timeout_rate) else 0.0
            return _FaultDraw(faults.latency_s + timeout)

    def get_order(self, order_id: str) -> _Reply:
        """A GET after its global faults: the order as read now, answered at once or, for a
        ``hold_get_answers`` order, once its gate opens."""
        with self._lock:
            stored = self._orders.get(order_id)
            if stored is None:
                return _not_found(order_id)
            knobs = stored.knobs
            if knobs.not_found_reads:
                knobs.not_found_reads -= 1
                return _not_found(order_id)
            if knobs.fail_gets:
                knobs.fail_gets -= 1
                return _unavailable("injected GET failure")
            self._advance_readiness(stored)
            stored.answered_reads += 1
            reply = _order_reply(stored.served(self._revision_form), knobs)
            self._buyer_after_read(stored)
            gate = None
            if knobs.hold_get_answers:
                knobs.hold_get_answers -= 1
                gate = self._get_gates.setdefault(order_id, threading.Event())
        if gate is not None:
            self._wait_at(gate, self._held_gets, order_id)
        return reply

    def put_fulfillment(self, order_id: str, idempotency_key: str | None, raw: bytes) -> _Reply:
        """One PUT from arrival to answer: the Idempotency-Key check (strict mode), the global
        faults, the holds, then the effect. The request is in flight from its arrival until it
        is applied or refused; the delays of its answer come after."""
        body = _parse_put_body(raw)
        fault = self.draw_fault()
        with self._lock:
            arrival = self._arrive(order_id, idempotency_key, body)
            if isinstance(arrival, _Refusal):
                reply = arrival.reply
                self._record_put(order_id, idempotency_key, body, arrival.outcome, reply.status)
                return replace(reply, delay_s=fault.delay_s)
        if fault.delay_s > 0:
            time.sleep(fault.delay_s)
        if fault.reply is not None:
            with self._lock:
                self._finish(arrival, applied=False)
                self._record_put(order_id, idempotency_key, body, "fault", fault.reply.status)
            return fault.reply
        held = self._hold(order_id)
        with self._lock:
            reply, outcome, changed = self._apply_put(order_id, idempotency_key, body)
            self._finish(arrival, applied=outcome == "applied")
            self._record_put(
                order_id, idempotency_key, body, outcome, reply.status, changed=changed, held=held
            )
        return reply

    def record_faulted_put(
        self, order_id: str, idempotency_key: str | None, raw: bytes, status: int
    ) -> None:
        """Record a PUT answered by an injected fault outside ``put_fulfillment`` (its key is
        bound in strict mode, as not applied)."""
        body = _parse_put_body(raw)
        with self._lock:
            arrival = self._arrive(order_id, idempotency_key, body)
            if isinstance(arrival, _Claim):
                self._finish(arrival, applied=False)
            self._record_put(order_id, idempotency_key, body, "fault", status)

    def release_puts(self, order_id: str) -> dict[str, Any] | None:
        """Open the gate of a ``hold_puts`` order: held PUTs take effect, later ones pass."""
        with self._lock:
            stored = self._orders.get(order_id)
            if stored is None:
                return None
            stored.knobs.hold_puts = 0
            gate = self._gates.pop(order_id, None)
        return self._opened(gate, order_id)

    def release_get_answers(self, order_id: str) -> dict[str, Any] | None:
        """Open the gate of a ``hold_get_answers`` order: held GETs answer what they read,
        later ones answer at once."""
        with self._lock:
            stored = self._orders.get(order_id)
            if stored is None:
                return None
            stored.knobs.hold_get_answers = 0
            gate = self._get_gates.pop(order_id, None)
        return self._opened(gate, order_id)

    def held_puts(self, order_id: str) -> int:
        """How many PUTs of the order wait at its gate now."""
        with self._lock:
            return self._held.get(order_id, 0)

    def held_get_answers(self, order_id: str) -> int:
        """How many GETs of the order have read it and wait at its gate now."""
        with self._lock:
            return self._held_gets.get(order_id, 0)

    def puts_in_flight(self, order_id: str) -> int:
        """How many PUTs of the order have arrived and are neither applied nor refused yet."""
        with self._lock:
            return self._in_flight.get(order_id, 0)

    def _opened(self, gate: threading.Event | None, order_id: str) -> dict[str, Any] | None:
        if gate is not None:
            gate.set()
        return self.order(order_id)

    def _wait_at(self, gate: threading.Event, waiting: dict[str, int], order_id: str) -> None:
        with self._lock:
            waiting[order_id] = waiting.get(order_id, 0) + 1
        try:
            gate.wait(_MAX_HOLD_S)  # bounded: a test that forgets to release cannot hang us
        finally:
            with self._lock:
                waiting[order_id] -= 1

    def _hold(self, order_id: str) -> bool:
        """Wait at the ``hold_puts`` gate, then for ``hold_puts_s`` and a drawn ``hold_s``;
        True when the PUT waited at all."""
        with self._lock:
            hold_s = self._faults.hold_s if self._chance(self._faults.hold_rate) else 0.0
            stored = self._orders.get(order_id)
            gate = None
            if stored is not None:
                hold_s += stored.knobs.hold_puts_s
                if stored.knobs.hold_puts:
                    stored.knobs.hold_puts -= 1
                    gate = self._gates.setdefault(order_id, threading.Event())
        if gate is not None:
            self._wait_at(gate, self._held, order_id)
        if hold_s > 0:
            time.sleep(hold_s)
        return gate is not None or hold_s > 0

    def _arrive(
        self, order_id: str, idempotency_key: str | None, body: _PutBody
    ) -> _Claim | _Refusal:
        """Strict mode binds a new key to this request, or refuses a request whose key is bound
        to another one, in flight, or already applied; lenient mode lets every request in."""
        binding = None
        if self._strict and idempotency_key:
            fingerprint = body.fingerprint(order_id)
            binding = self._keys.setdefault(idempotency_key, _KeyBinding(fingerprint))
            if binding.fingerprint != fingerprint:
                message = "this Idempotency-Key was first sent with another request"
                return _Refusal(_error_reply(422, "IDEMPOTENCY_KEY_REUSED", message), "key_reused")
            if binding.in_flight:
                message = "a request with this Idempotency-Key is still being handled"
                reply = _error_reply(409, "IDEMPOTENCY_KEY_IN_FLIGHT", message, retryable=True)
                return _Refusal(reply, "in_flight")
            if binding.applied:
                return _Refusal(_Reply(204), "replayed")
            binding.in_flight = True
        self._in_flight[order_id] = self._in_flight.get(order_id, 0) + 1
        return _Claim(order_id, binding)

    def _finish(self, claim: _Claim, *, applied: bool) -> None:
        if claim.binding is not None:
            claim.binding.in_flight = False
            claim.binding.applied = claim.binding.applied or applied
        self._in_flight[claim.order_id] -= 1

    def _chance(self, rate: float) -> bool:
        return rate > 0 and self._random.random() < rate

    @staticmethod
    def _advance_readiness(stored: _StoredOrder) -> None:
        """Flip a not-yet-paid order to READY once ``ready_after_reads`` answers were given."""
        knobs, body = stored.knobs, stored.body
        if knobs.ready_after_reads and stored.answered_reads >= knobs.ready_after_reads:
            knobs.ready_after_reads = 0
            if body["status"] in _NOT_PAID:
                body["status"] = "READY_FOR_PROCESSING"
                stored.bump()

    def _buyer_after_read(self, stored: _StoredOrder) -> None:
        """What the buyer does right after a GET read the order: the per-order knobs, then the
        global rates (only for an order ready for processing)."""
        knobs, body = stored.knobs, stored.body
        if knobs.edit_after_reads and stored.answered_reads >= knobs.edit_after_reads:
            knobs.edit_after_reads = 0
            self._buyer_edit(stored)
        if knobs.cancel_after_reads and stored.answered_reads >= knobs.cancel_after_reads:
            knobs.cancel_after_reads = 0
            self._buyer_cancel(stored)
        if body["status"] != "READY_FOR_PROCESSING":
            return
        if self._chance(self._faults.buyer_edit_rate):
            self._buyer_edit(stored)
        if body["fulfillment_status"] == "NEW" and self._chance(self._faults.buyer_cancel_rate):
            self._buyer_cancel(stored)

    def _buyer_edit(self, stored: _StoredOrder) -> None:
        stored.bump()
        self._buyer_event(stored, "edit")

    def _buyer_cancel(self, stored: _StoredOrder) -> None:
        if stored.body["status"] != "CANCELLED":
            stored.body["status"] = "CANCELLED"
            stored.bump()
            self._buyer_event(stored, "cancel")

    def _buyer_event(self, stored: _StoredOrder, kind: str) -> None:
        self._buyer_events.append(
            {
                "order_id": stored.body["id"],
                "kind": kind,
                "at": datetime.now(UTC).isoformat(),
                "revision": stored.revision(self._revision_form),
            }
        )

    def _apply_put(
        self, order_id: str, idempotency_key: str | None, body: _PutBody
    ) -> tuple[_Reply, str, bool]:
        """The answer, the outcome and whether the fulfillment status changed."""
        stored = self._orders.get(order_id)
        if stored is None:
            return _not_found(order_id), "error", False
        if stored.knobs.fail_puts:
            stored.knobs.fail_puts -= 1
            return _unavailable("injected PUT failure"), "fault", False
        if not idempotency_key:
            reply = _error_reply(422, "MISSING_IDEMPOTENCY_KEY", "Idempotency-Key required")
            return reply, "error", False
        if body.problem is not None:
            return _error_reply(422, "INVALID_BODY", body.problem), "error", False
        if idempotency_key in self._applied_keys:  # lenient mode (strict ones stop on arrival)
            return _Reply(204), "replayed", False
        revision = stored.revision(self._revision_form)
        if not _same_revision(body.expected_revision, revision):
            message = f"expected revision {body.expected_revision!r}, order is at {revision!r}"
            reply = _error_reply(409, "REVISION_CONFLICT", message, retryable=True)
            return reply, "conflict", False
        changed = stored.body["fulfillment_status"] != body.status
        stored.body["fulfillment_status"] = body.status
        if changed or not self._strict:  # strict: the revision moves only when the order does
            stored.bump()
        self._applied_keys[idempotency_key] = order_id
        return self._answer_to_applied_put(stored.knobs), "applied", changed

    def _answer_to_applied_put(self, knobs: _OrderKnobs) -> _Reply:
        """204, unless a knob loses the answer of a PUT that has already taken effect."""
        if knobs.fail_puts_after_apply:
            knobs.fail_puts_after_apply -= 1
            return _error_reply(
                502, "BAD_GATEWAY", "backend answer lost after applying", retryable=True
            )
        if knobs.drop_puts_after_apply:
            knobs.drop_puts_after_apply -= 1
            return _Reply(204, drop=True)
        delay = knobs.put_latency_s
        if self._chance(self._faults.late_answer_rate):
            delay = max(delay, self._faults.late_answer_s)
        return _Reply(204, delay_s=delay)

    def _record_put(
        self,
        order_id: str,
        idempotency_key: str | None,
        body: _PutBody,
        outcome: str,
        http_status: int,
        *,
        changed: bool = False,
        held: bool = False,
    ) -> None:
        self._fulfillments.append(
            {
                "order_id": order_id,
                "idempotency_key": idempotency_key,
                "status": body.status,
                "expected_revision": body.expected_revision,
                "outcome": outcome,
                "http_status": http_status,
                "changed": changed,
                "held": held,
                "at": datetime.now(UTC).isoformat(),
            }
        )


# --- HTTP -------------------------------------------------------------------------------------


class _FakeHTTPServer(ThreadingHTTPServer):
    """Threaded server that knows its open connections, so ``stop()`` can close idle ones."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # benchmarks open many connections at once

    def __init__(self, address: tuple[str, int], state: _FakeState) -> None:
        self.state = state
        self.stopping = False
        self.accepted_connections = 0
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # skip HTTPServer.server_bind: its socket.getfqdn() can wait seconds on reverse DNS
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
            self.accepted_connections += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open connection; handler threads then see EOF and end."""
        self.stopping = True
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the peer
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        # a client that hung up, or a connection closed by stop(), is not a fault of the fake
        if isinstance(error, ConnectionError) or (self.stopping and isinstance(error, OSError)):
            return
        super().handle_error(request, client_address)


class _FakeHTTPServerV6(_FakeHTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """Routes contract and admin requests; each answer leaves in a single write."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a pooled client expects
    disable_nagle_algorithm = True  # with one write per answer: no delayed-ACK stalls
    server: _FakeHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: one stderr line per request drowns test and demo output."""

    def do_GET(self) -> None:
        self._dispatch()

    do_PUT = do_POST = do_DELETE = do_PATCH = do_GET

    def _dispatch(self) -> None:
        body = self._read_body()
        path = urlsplit(self.path).path
        segments = [unquote(segment) for segment in path.split("/")[1:]]
        try:
            if body is None:
                self.close_connection = True  # the rest of the stream cannot be trusted
                self._send(_error_reply(400, "BAD_REQUEST", "unreadable or chunked body"))
            elif segments[:1] == ["v1"]:
                self._contract(segments[1:], body)
            elif segments[:1] == ["_admin"]:
                self._send(self._admin(segments[1:], body))
            else:
                self._send(_error_reply(404, "NOT_FOUND", f"no route {self.command} {path}"))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (e.g. its read timeout)

    def _read_body(self) -> bytes | None:
        """The request body; None when it cannot be read safely (chunked, bad length)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return None
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            size = int(length)
        except ValueError:
            return None
        if not 0 <= size <= _MAX_BODY_BYTES:
            return None
        return self.rfile.read(size)

    def _send(self, reply: _Reply) -> None:
        if reply.delay_s > 0:
            time.sleep(reply.delay_s)
        if reply.drop:
            self.close_connection = True  # no answer at all: the client sees the socket close
            return
        encoded = _encode_response(reply, close=self.close_connection)
        if reply.trickle_s <= 0 or not reply.body:
            self.wfile.write(encoded)
            return
        self._trickle(encoded, len(encoded) - len(reply.body), reply.trickle_s)

    def _trickle(self, encoded: bytes, head_size: int, interval_s: float) -> None:
        """The head at once, then the body a byte at a time until sent, or until the client
        hangs up (a write fails) or the server stops."""
        self.wfile.write(encoded[:head_size])
        for offset in range(head_size, len(encoded)):
            time.sleep(interval_s)
            if self.server.stopping:
                self.close_connection = True
                return
            self.wfile.write(encoded[offset : offset + 1])

    def _contract(self, segments: list[str], body: bytes) -> None:
        match segments:
            case ["orders", order_id] if order_id:
                expected_method = "GET"
            case ["orders", order_id, "fulfillment"] if order_id:
                expected_method = "PUT"
            case _:
                self._send(_error_reply(404, "NOT_FOUND", f"no route {self.command} {self.path}"))
                return
        if self.command != expected_method:
            message = f"{self.command} not allowed here"
            allow = (("Allow", expected_method),)
            self._send(_error_reply(405, "METHOD_NOT_ALLOWED", message, headers=allow))
            return
        self._send(self._answer_contract(order_id, body))

    def _answer_contract(self, order_id: str, body: bytes) -> _Reply:
        state = self.server.state
        state.count_request(self.command)
        if self.command == "PUT":  # its key is looked at before the faults: see put_fulfillment
            idempotency_key = (self.headers.get("Idempotency-Key") or "").strip() or None
            return state.put_fulfillment(order_id, idempotency_key, body)
        fault = state.draw_fault()
        if fault.delay_s > 0:
            time.sleep(fault.delay_s)
        return fault.reply if fault.reply is not None else state.get_order(order_id)

    def _admin(self, segments: list[str], body: bytes) -> _Reply:
        try:
            return self._admin_route(segments, body)
        except InvalidInput as exc:
            return _error_reply(422, "INVALID_REQUEST", str(exc))

    def _admin_route(self, segments: list[str], body: bytes) -> _Reply:
        state = self.server.state
        match (self.command, segments):
            case ("GET", ["health"]):
                return _json_reply(200, {"status": "ok", "orders": state.order_count()})
            case ("POST", ["orders"]):
                return _json_reply(201, {"added": _add_from_json(state, _json_body(body))})
            case ("GET", ["orders", order_id]):
                return _order_or_404(order_id, state.order(order_id))
            case ("POST", ["orders", order_id, "cancel"]):
                return _order_or_404(order_id, state.cancel(order_id))
            case ("POST", ["orders", order_id, "release"]):
                return _order_or_404(order_id, state.release_puts(order_id))
            case ("POST", ["orders", order_id, "release_gets"]):
                return _order_or_404(order_id, state.release_get_answers(order_id))
            case ("POST", ["orders", order_id, "edit"]):
                return _order_or_404(order_id, state.buyer_edit(order_id))
            case ("POST", ["orders", order_id, "fulfillment"]):
                status = _fields(body, "status")["status"]
                return _order_or_404(order_id, state.set_fulfillment_status(order_id, status))
            case ("GET", ["orders", order_id, "holds"]):
                return _holds_or_404(state, order_id)
            case ("GET", ["buyer_events"]):
                return _json_reply(200, {"buyer_events": state.buyer_events()})
            case ("GET", ["mode"]):
                return _json_reply(200, {"strict": state.strict()})
            case ("POST", ["mode"]):
                strict = _fields(body, "strict")["strict"]
                return _json_reply(200, {"strict": state.set_strict(strict)})
            case ("GET", ["revision_form"]):
                return _json_reply(200, {"revision_form": state.revision_form()})
            case ("POST", ["revision_form"]):
                form = _json_object(_json_body(body)).get("revision_form")
                return _json_reply(200, {"revision_form": state.set_revision_form(form)})
            case ("GET", ["faults"]):
                return _json_reply(200, state.faults())
            case ("POST", ["faults"]):
                return _json_reply(200, state.set_faults(_json_object(_json_body(body))))
            case ("GET", ["fulfillments"]):
                return _json_reply(200, {"fulfillments": state.fulfillment_requests()})
            case ("GET", ["requests"]):
                return _json_reply(200, {"contract_requests": state.contract_requests()})
            case ("POST", ["reset"]):
                state.reset()
                return _json_reply(200, {"status": "reset"})
        return _error_reply(404, "NOT_FOUND", f"no admin route {self.command} {self.path}")


def _json_body(body: bytes) -> object:
    try:
        return json.loads(body) if body else None
    except ValueError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from exc


def _json_object(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput("request body must be a JSON object")
    return value


def _fields(body: bytes, *names: str) -> dict[str, Any]:
    """A JSON object body with exactly these keys."""
    payload = _json_object(_json_body(body))
    _reject_unknown(payload, names, "request body")
    missing = [name for name in names if name not in payload]
    if missing:
        raise InvalidInput(f"request body: missing {', '.join(missing)}")
    return payload


def _holds_or_404(state: _FakeState, order_id: str) -> _Reply:
    if state.order(order_id) is None:
        return _not_found(order_id)
    holds = {
        "held_puts": state.held_puts(order_id),
        "puts_in_flight": state.puts_in_flight(order_id),
        "held_get_answers": state.held_get_answers(order_id),
    }
    return _json_reply(200, holds)


def _add_from_json(state: _FakeState, payload: object) -> list[str]:
    """POST /_admin/orders: one order, or ``{"orders": [...]}``."""
    if isinstance(payload, dict) and "orders" in payload and "id" not in payload:
        orders = payload["orders"]
        if not isinstance(orders, list):
            raise InvalidInput("orders must be a list")
        return state.add_orders(orders, {})
    return state.add_orders([payload], {})


def _order_or_404(order_id: str, order: dict[str, Any] | None) -> _Reply:
    return _not_found(order_id) if order is None else _json_reply(200, order)


# --- public API -------------------------------------------------------------------------------


class FakeMicroservice:
    """The fake served on ``host:port`` (port 0: any free port) from a daemon thread.

    Helpers mirror the admin API and act on the same state, so a test can mix both. Invalid
    orders or knobs raise InvalidInput naming the field; nothing is stored then.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        orders: Iterable[Mapping[str, Any]] = (),
        seed: int = 0,
        revision_form: RevisionForm = "string",
        strict: bool = DEFAULT_STRICT,
    ) -> None:
        self._host = host
        self._port = port
        self._state = _FakeState(seed, _revision_form(revision_form), strict=strict)
        self._state.add_orders(list(orders), {})
        self._server: _FakeHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Bind and serve; returns self so ``with FakeMicroservice().start() as fake`` works."""
        if self._server is not None:
            raise RuntimeError("FakeMicroservice is already running")
        server_class = _FakeHTTPServerV6 if ":" in self._host else _FakeHTTPServer
        self._server = server_class((self._host, self._port), self._state)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # stop() returns within this
            name=f"fake-microservice:{self._server.server_port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close open connections; a no-op when not running."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server, self._thread = None, None
        server.shutdown()
        server.close_connections()
        server.server_close()
        thread.join()

    def wait(self) -> None:
        """Block until stopped (Ctrl-C raises KeyboardInterrupt here)."""
        thread = self._thread
        while thread is not None and thread.is_alive():
            thread.join(0.5)

    @property
    def url(self) -> str:
        """Base URL such as ``http://127.0.0.1:54321``; only while running."""
        if self._server is None:
            raise RuntimeError("FakeMicroservice is not running; call start() first")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._server.server_port}"

    def __enter__(self) -> Self:
        return self if self._server is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def add_order(self, order: Mapping[str, Any], **knobs: Any) -> None:
        """Store (or replace) an order; knobs as keyword arguments override keys in the order."""
        self._state.add_orders([order], knobs)

    @property
    def revision_form(self) -> RevisionForm:
        """How revisions are served: ``"string"`` (opaque tokens) or ``"integer"``."""
        return self._state.revision_form()

    def set_revision_form(self, form: RevisionForm) -> None:
        """Serve revisions in ``form`` from now on (stored orders keep their counters)."""
        self._state.set_revision_form(form)

    @property
    def strict(self) -> bool:
        """True when the fake behaves as Allegro does (see the module docstring), False when
        lenient."""
        return self._state.strict()

    def set_strict(self, strict: bool) -> None:
        """Strict (True) or lenient (False) from the next request on; keys and orders stay."""
        self._state.set_strict(strict)

    def connections_accepted(self) -> int:
        """How many TCP connections the server has accepted since it started."""
        if self._server is None:
            raise RuntimeError("FakeMicroservice is not running; call start() first")
        return self._server.accepted_connections

    def set_faults(self, **knobs: Any) -> None:
        """Change the named global fault knobs; the others keep their values."""
        self._state.set_faults(knobs)

    def faults(self) -> dict[str, Any]:
        """The current global fault knobs."""
        return self._state.faults()

    def fulfillment_requests(self) -> list[dict[str, Any]]:
        """Every PUT received, oldest first (recorded once answered or applied): order_id,
        idempotency_key, status, expected_revision, outcome (applied, replayed, conflict,
        key_reused, in_flight, error, fault), http_status, changed (the fulfillment status
        changed), held (it waited at a gate or a timed hold), at."""
        return self._state.fulfillment_requests()

    def contract_requests(self) -> dict[str, int]:
        """Contract requests that reached a route since the fake started, by method
        (``{"GET": n, "PUT": n}``; ``reset`` keeps the counts)."""
        return self._state.contract_requests()

    def buyer_events(self) -> list[dict[str, Any]]:
        """The buyer's edits and cancellations, oldest first: order_id, kind ("edit" or
        "cancel"), at, revision (the one the change made)."""
        return self._state.buyer_events()

    def order(self, order_id: str) -> dict[str, Any]:
        """A copy of the order as stored now (its contract body)."""
        return self._existing(order_id, self._state.order(order_id))

    def cancel_order(self, order_id: str) -> None:
        """The buyer cancels the order: status CANCELLED, a new revision (a buyer event)."""
        self._existing(order_id, self._state.cancel(order_id))

    def buyer_edit(self, order_id: str) -> None:
        """The buyer edits the order (address, delivery): a new revision, nothing else."""
        self._existing(order_id, self._state.buyer_edit(order_id))

    def set_fulfillment_status(self, order_id: str, status: str) -> None:
        """Change the fulfillment status behind the product's back, as the seller or another
        tool would; the revision moves when the status changes."""
        self._existing(order_id, self._state.set_fulfillment_status(order_id, status))

    def release_puts(self, order_id: str) -> None:
        """Let the held PUTs of a ``hold_puts`` order take effect (and stop holding new ones)."""
        self._existing(order_id, self._state.release_puts(order_id))

    def held_puts(self, order_id: str) -> int:
        """How many PUTs of a ``hold_puts`` order are waiting at its gate."""
        return self._state.held_puts(order_id)

    def puts_in_flight(self, order_id: str) -> int:
        """How many PUTs of the order have arrived and are neither applied nor refused yet
        (sleeping on a global fault, at the gate, in a timed hold)."""
        return self._state.puts_in_flight(order_id)

    def release_get_answers(self, order_id: str) -> None:
        """Let the held GETs of a ``hold_get_answers`` order answer what they read (and stop
        holding new ones)."""
        self._existing(order_id, self._state.release_get_answers(order_id))

    def held_get_answers(self, order_id: str) -> int:
        """How many GETs of a ``hold_get_answers`` order have read it and wait at its gate."""
        return self._state.held_get_answers(order_id)

    def reset(self) -> None:
        """Forget orders, recorded PUTs, Idempotency-Keys and buyer events, open every gate;
        faults, the revision form and the mode given to the constructor and the random draws
        restart."""
        self._state.reset()

    @staticmethod
    def _existing(order_id: str, order: dict[str, Any] | None) -> dict[str, Any]:
        if order is None:
            raise InvalidInput(f"order_id: no order {order_id!r} in the fake microservice")
        return order


def serve(
    *,
    host: str,
    port: int,
    orders_file: str | None,
    faults: Mapping[str, Any],
    on_ready: Callable[[str], None] | None = None,
    revision_form: RevisionForm = "string",
    strict: bool = DEFAULT_STRICT,
) -> None:
    """Serve the fake in the foreground until interrupted (the ``fake-microservice`` command).

    Raises InvalidInput (one line) for a bad orders file, bad faults or an unusable address.
    ``on_ready`` gets the URL once listening; by default it is printed to stderr.
    """
    orders = load_orders_file(orders_file) if orders_file else []
    fake = FakeMicroservice(host, port, orders=orders, revision_form=revision_form, strict=strict)
    fake.set_faults(**faults)
    try:
        fake.start()
    except OSError as exc:
        raise InvalidInput(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    announce = on_ready or _print_url
    try:
        announce(fake.url)  # inside: a failing callback must not leave the server running
        fake.wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


def _print_url(url: str) -> None:
    print(f"fake microservice listening on {url}", file=sys.stderr, flush=True)

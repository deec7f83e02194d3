"""What the fake is given, checked: orders (with their per-order knobs), global fault knobs,
an orders file and the body of a fulfillment PUT. A bad value raises InvalidInput naming it.

The order's fields, its statuses and the rules of a revision are the client's own
(``stock_sync.adapters.marketplace_contract``); an order is stored as a :class:`StoredOrder`,
whose revision is made up in the form the fake serves.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from stock_sync.adapters.marketplace_contract import (
    FULFILLMENT_STATUSES,
    ORDER_STATUSES,
    REVISION_MAX_CHARS,
    MicroserviceOrder,
    OrderLineItem,
    revision_problem,
)
from stock_sync.domain.errors import InvalidInput
from stock_sync.domain.revisions import Revision

_ORDER_FIELDS = frozenset(MicroserviceOrder.model_fields)
_LINE_FIELDS = frozenset(OrderLineItem.model_fields)
_MAX_BOMB_BYTES = 1024**3

MalformedMode = Literal["json", "contract"]
RevisionForm = Literal["string", "integer"]
REVISION_FORMS: tuple[RevisionForm, ...] = ("string", "integer")


@dataclass
class OrderKnobs:
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
class Faults:
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


ORDER_KNOBS = tuple(knob.name for knob in fields(OrderKnobs))
FAULT_KNOBS = tuple(knob.name for knob in fields(Faults))


@dataclass
class StoredOrder:
    """An order's contract body without its revision, which ``counter`` (+ 1 at each change),
    ``token`` (a string revision given with the order, until its first change) and
    ``generation`` (how many times the id was added before) make up in either form."""

    body: dict[str, Any]
    knobs: OrderKnobs
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
class PutBody:
    status: str | None = None
    expected_revision: Revision | None = None
    problem: str | None = None

    def fingerprint(self, order_id: str) -> tuple[object, ...]:
        """What binds an Idempotency-Key in strict mode: the order and the body, the revision's
        type included ("1" is not 1)."""
        revision = self.expected_revision
        return (order_id, self.status, type(revision).__name__, revision)


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


def flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be true or false, got {value!r}")
    return value


def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{name} must be a non-empty string, got {value!r}")
    return value


def one_of(value: object, allowed: Iterable[str], name: str) -> str:
    choices = sorted(allowed)
    if value not in choices:
        raise InvalidInput(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _revision(value: object, name: str) -> Revision:
    """An integer >= 0, or a non-empty string of at most 64 characters without control
    characters or lone surrogates."""
    if isinstance(value, str):
        if revision_problem(value) is None:
            return value
        raise InvalidInput(
            f"{name} must be a non-empty string of at most {REVISION_MAX_CHARS} characters, "
            f"without control characters or lone surrogates, got {value!r}"
        )
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{name} must be an integer >= 0 or a string, got {value!r}")
    return value


def checked_revision_form(value: object, name: str = "revision_form") -> RevisionForm:
    for form in REVISION_FORMS:
        if value == form:
            return form
    raise InvalidInput(f"{name} must be one of {', '.join(REVISION_FORMS)}, got {value!r}")


def reject_unknown(keys: Iterable[str], known: Iterable[str], where: str) -> None:
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise InvalidInput(f"{where}: unknown keys {', '.join(unknown)}; known: {', '.join(known)}")


def _malformed_mode(value: object, name: str) -> MalformedMode | None:
    if value is None or value == "json" or value == "contract":
        return value
    raise InvalidInput(f"{name} must be 'json', 'contract' or null, got {value!r}")


def _order_knobs(values: Mapping[str, Any], where: str) -> OrderKnobs:
    reject_unknown(values, ORDER_KNOBS, where)
    checked: dict[str, Any] = {}
    for knob in fields(OrderKnobs):
        check = _KNOB_CHECKS.get(knob.name) or (
            _seconds if isinstance(knob.default, float) else _count
        )
        checked[knob.name] = check(values.get(knob.name, knob.default), f"{where}: {knob.name}")
    return OrderKnobs(**checked)


def _bomb_size(value: object, name: str) -> int:
    size = _count(value, name)
    if size > _MAX_BOMB_BYTES:
        raise InvalidInput(f"{name} must be at most {_MAX_BOMB_BYTES}, got {size}")
    return size


# knobs checked otherwise than by the type of their default (a float: seconds, an int: a count)
_KNOB_CHECKS: dict[str, Callable[[object, str], object]] = {
    "malformed": _malformed_mode,
    "gzip_bomb_bytes": _bomb_size,
}


def _line_item(raw: object, order_id: str, index: int) -> dict[str, Any]:
    where = f"order {order_id}: line_items.{index}"
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"{where} must be an object, got {raw!r}")
    reject_unknown(raw, sorted(_LINE_FIELDS), where)
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


def checked_order(raw: object, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], OrderKnobs]:
    """A contract order body with defaults filled in, and its knobs; InvalidInput names the field.

    Defaults: revision 1 (an integer or a string), status READY_FOR_PROCESSING,
    fulfillment_status NEW, account_name null, line ids ``{order}-line-{n}``, offer ids
    ``offer-{sku}``.
    """
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"an order must be a JSON object, got {type(raw).__name__}")
    order_id = _text(raw.get("id"), "order id")
    where = f"order {order_id}"
    reject_unknown(raw, sorted(_ORDER_FIELDS | set(ORDER_KNOBS)), where)
    knobs = _order_knobs({**{k: raw[k] for k in ORDER_KNOBS if k in raw}, **overrides}, where)
    account_name = raw.get("account_name")
    if account_name is not None:
        _text(account_name, f"{where}: account_name")
    line_items = raw.get("line_items")
    if not isinstance(line_items, list):
        raise InvalidInput(f"{where}: line_items must be a list, got {line_items!r}")
    status = one_of(raw.get("status", "READY_FOR_PROCESSING"), ORDER_STATUSES, f"{where}: status")
    if knobs.ready_after_reads and status == "READY_FOR_PROCESSING":
        status = "BOUGHT"  # it becomes ready once the reads have happened
    body = {
        "id": order_id,
        "account_name": account_name,
        "revision": _revision(raw.get("revision", 1), f"{where}: revision"),
        "status": status,
        "fulfillment_status": one_of(
            raw.get("fulfillment_status", "NEW"),
            FULFILLMENT_STATUSES,
            f"{where}: fulfillment_status",
        ),
        "line_items": [_line_item(line, order_id, i) for i, line in enumerate(line_items)],
    }
    return body, knobs


def updated_faults(current: Faults, changes: Mapping[str, Any]) -> Faults:
    reject_unknown(changes, FAULT_KNOBS, "faults")
    checked: dict[str, Any] = {}
    for name, value in changes.items():
        if name.endswith("_rate"):
            checked[name] = _rate(value, f"faults: {name}")
        elif name == "retry_after_s" and value is None:
            checked[name] = None
        else:
            checked[name] = _seconds(value, f"faults: {name}")
    return replace(current, **checked)


def parse_put_body(raw: bytes) -> PutBody:
    """The PUT body's fields, with ``problem`` set when it breaks the contract."""
    try:
        body = json.loads(raw)
    except ValueError:
        return PutBody(problem="body is not valid JSON")
    if not isinstance(body, dict):
        return PutBody(problem="body must be a JSON object")
    status, revision = body.get("status"), body.get("expected_revision")
    recorded = PutBody(
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
            checked_order(order, {})
    except InvalidInput as exc:
        raise InvalidInput(f"orders file {path}: {exc}") from exc
    return orders

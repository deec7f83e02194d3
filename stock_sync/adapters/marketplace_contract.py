"""The microservice contract as data (see DESIGN.md, "The microservice contract"): the order and
its line items as the client accepts them, the statuses, the wire form of a revision, the error
bodies and their codes, and how an answer the client did not expect maps to an error of
``stock_sync.domain.errors``.

Both sides speak it from here: ``MicroserviceClient`` parses answers with these models, and the
fake microservice (``stock_sync_fake``) uses the same statuses, revision rules and error bodies,
so the two cannot drift apart.

Every field of an answer is untrusted: strings are bounded by the database columns they end up
in and may hold no control character or lone surrogate, quantities are bounded and line ids are
unique.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NoReturn, get_args

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

from stock_sync.adapters.redaction import one_line
from stock_sync.domain import errors
from stock_sync.domain.revisions import Revision

OrderStatus = Literal["BOUGHT", "FILLED_IN", "READY_FOR_PROCESSING", "CANCELLED"]
ORDER_STATUSES: tuple[str, ...] = get_args(OrderStatus)
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

# Bounds of an answer. The string limits are the lengths of the columns the values end up in
# (stock_sync/adapters/models.py: order_id, account_name, line_item_id, sku: 128; the fulfillment
# status recorded before a sync: 32); tests/unit/test_microservice_client.py checks that they still
# agree.
TEXT_MAX_CHARS = 128
FULFILLMENT_STATUS_MAX_CHARS = 32
REVISION_MAX_CHARS = 64
DEFAULT_MAX_LINE_QUANTITY = 1_000_000
MAX_LINE_QUANTITY_LIMIT = 2**31 - 1  # stock quantities are 32-bit integer columns

CONTRACT_BROKEN = "microservice response breaks the contract"
# The error codes of the contract; the two idempotency-key ones follow the IETF draft the
# wrapper follows (DESIGN.md).
ORDER_NOT_FOUND = "ORDER_NOT_FOUND"
REVISION_CONFLICT = "REVISION_CONFLICT"
IDEMPOTENCY_KEY_IN_FLIGHT = "IDEMPOTENCY_KEY_IN_FLIGHT"
IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
_MAX_DETAIL_CHARS = 200
_MAX_CONTRACT_CHARS = 600
# Unicode category Cc (C0, DEL, C1) and the surrogate range (only lone ones survive decoding)
_FORBIDDEN_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def detail_line(text: str, limit: int = _MAX_DETAIL_CHARS) -> str:
    """``text`` for an error message: whitespace collapsed, anything unprintable escaped, at
    most ``limit`` characters."""
    return one_line(" ".join(text.split()), limit, every_unprintable=True)


# --- the order ------------------------------------------------------------------------------


def forbidden_character(text: str) -> str | None:
    """What is wrong with ``text`` (its first control character or lone surrogate), or None."""
    found = _FORBIDDEN_CHARACTER.search(text)
    if found is None:
        return None
    code = ord(found.group())
    kind = "lone surrogate" if 0xD800 <= code <= 0xDFFF else "control character"
    return f"{kind} U+{code:04X} at index {found.start()}"


def _clean_text(value: object) -> object:
    """Before str validation (which would refuse a lone surrogate without saying why)."""
    problem = forbidden_character(value) if isinstance(value, str) else None
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
    """Why ``value`` is not a usable revision on the wire, or None when it is one."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return f"must be a string or an integer, got {type(value).__name__}"
    text = value if isinstance(value, str) else str(value)
    if not text:
        return "must not be empty"
    if len(text) > REVISION_MAX_CHARS:
        return f"must have at most {REVISION_MAX_CHARS} characters"
    problem = forbidden_character(text)
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


def parse_order(body: bytes, max_line_quantity: int) -> MicroserviceOrder:
    """Validate a 200 body against the contract; the error names the offending field."""
    data = _decode_json(body)
    try:
        return MicroserviceOrder.model_validate(
            data, context={"max_line_quantity": max_line_quantity}
        )
    except ValidationError as exc:
        raise errors.ContractViolation(_describe_validation_error(exc), status_code=200) from exc


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
    raise errors.ContractViolation(
        f"microservice response is not valid JSON: {detail_line(problem)}", status_code=200
    )


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


def _describe_validation_error(exc: ValidationError) -> str:
    problems = [
        f"{'.'.join(str(part) for part in error['loc']) or '(body)'}: {error['msg']}"
        for error in exc.errors(include_url=False)
    ]
    return detail_line(f"{CONTRACT_BROKEN}: {'; '.join(problems)}", _MAX_CONTRACT_CHARS)


# --- answers and errors ---------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """Status, headers and body of one exchange. ``problem`` says why the body is unusable
    (longer than the cap, or not decodable); only an answer that needs its body fails on it."""

    status_code: int
    headers: Mapping[str, str]
    body: bytes
    problem: str | None = None


def error_body(code: str, message: str, *, retryable: bool = False) -> dict[str, Any]:
    """The body of a contract error answer."""
    return {"error": {"code": code, "message": message, "retryable": retryable}}


def raise_for_status(method: str, path: str, answer: Answer) -> NoReturn:
    """Map a status the caller did not expect to the matching error class."""
    status = answer.status_code
    message = f"{method} {path}: HTTP {status}{_error_detail(answer.body)}"
    if status == 429:
        raise errors.MicroserviceRateLimited(message, retry_after_s=_retry_after_s(answer.headers))
    if status >= 500:
        raise errors.MicroserviceServerError(
            message, status_code=status, retry_after_s=_retry_after_s(answer.headers)
        )
    code = _error_field(answer.body, "code")
    if status == 409 and code == IDEMPOTENCY_KEY_IN_FLIGHT:
        raise errors.IdempotencyKeyInFlight(message, status_code=status)
    if status == 409:
        raise errors.RevisionConflict(message, status_code=status)
    if status == 422 and code == IDEMPOTENCY_KEY_REUSED:
        raise errors.IdempotencyKeyReused(message, status_code=status)
    if 400 <= status < 500:
        raise errors.UnprocessableRequest(message, status_code=status)
    # 1xx/2xx/3xx where the contract promises something else
    raise errors.ContractViolation(f"{CONTRACT_BROKEN}: unexpected {message}", status_code=status)


def _error_object(body: bytes) -> dict[str, Any] | None:
    """The ``error`` object of a contract error body, or None."""
    try:
        parsed = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deeply, cut short
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if isinstance(error, dict) else None


def _error_field(body: bytes, name: str) -> str | None:
    """A string field of the ``error`` object (such as its ``code``), or None."""
    value = (_error_object(body) or {}).get(name)
    return value if isinstance(value, str) else None


def _error_detail(body: bytes) -> str:
    """': CODE: message' from a contract error body, or '' when there is none."""
    error = _error_object(body) or {}
    parts = [
        str(error[key])
        for key in ("code", "message")
        if isinstance(error.get(key), str | int) and error[key] != ""
    ]
    return detail_line(": " + ": ".join(parts)) if parts else ""


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

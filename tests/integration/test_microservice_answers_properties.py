"""Properties of MicroserviceClient over every answer the microservice may give, honest or not.

The answers go through ``responses`` (in-process, fast) for the hostile ones, and through the
fake over real HTTP for the honest round trip. ``contract_problems`` below is an independent
statement of the contract's bounds (DESIGN.md, "The microservice contract"): the client must
agree with it, refusing exactly the answers it flags and naming a field it flags.
"""

from __future__ import annotations

import gzip
import json
import re
import unicodedata
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import responses
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stock_sync.adapters.marketplace_contract import MicroserviceOrder
from stock_sync.adapters.microservice_client import DEFAULT_MAX_RESPONSE_BYTES, MicroserviceClient
from stock_sync.domain.errors import (
    ContractViolation,
    MicroserviceError,
    MicroserviceRateLimited,
    MicroserviceServerError,
    OrderNotFound,
    RevisionConflict,
    UnprocessableRequest,
)
from stock_sync_fake import FULFILLMENT_STATUSES, FakeMicroservice

BASE_URL = "http://microservice.test"
ORDER_ID = "o-1"
ORDER_URL = f"{BASE_URL}/v1/orders/{ORDER_ID}"
MAX_QUANTITY = 1_000_000
CAP = 4096  # small, so that generated answers fall on both sides of it
ORDER_STATUSES = ("BOUGHT", "FILLED_IN", "READY_FOR_PROCESSING", "CANCELLED")

# --- the contract, stated independently of the client --------------------------------------


def clean_text(value: object, max_chars: int) -> bool:
    """A non-empty string within the column, without control characters or lone surrogates."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= max_chars
        and not any(unicodedata.category(char) in ("Cc", "Cs") for char in value)
    )


def good_revision(value: object) -> bool:
    if isinstance(value, str):
        return clean_text(value, 64)
    return isinstance(value, int) and not isinstance(value, bool) and len(str(value)) <= 64


def good_quantity(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_QUANTITY


def contract_problems(body: object, asked_id: str = ORDER_ID) -> set[str]:
    """The paths of every field of ``body`` that breaks the contract ("(body)" for the whole)."""
    if not isinstance(body, dict):
        return {"(body)"}
    problems = set()
    if not clean_text(body.get("id"), 128) or body["id"] != asked_id:
        problems.add("id")
    if "account_name" not in body or not (
        body["account_name"] is None or clean_text(body["account_name"], 128)
    ):
        problems.add("account_name")
    if not good_revision(body.get("revision")):
        problems.add("revision")
    if body.get("status") not in ORDER_STATUSES or not isinstance(body.get("status"), str):
        problems.add("status")
    if not clean_text(body.get("fulfillment_status"), 32):
        problems.add("fulfillment_status")
    return problems | line_problems(body.get("line_items"))


def line_problems(lines: object) -> set[str]:
    if not isinstance(lines, list) or not lines:
        return {"line_items"}
    problems = set()
    for index, line in enumerate(lines):
        if not isinstance(line, dict):
            problems.add(f"line_items.{index}")
            continue
        for field in ("id", "offer_id", "sku"):
            if not clean_text(line.get(field), 128):
                problems.add(f"line_items.{index}.{field}")
        if not good_quantity(line.get("quantity")):
            problems.add(f"line_items.{index}.quantity")
    ids = [line.get("id") for line in lines if isinstance(line, dict)]
    if len(ids) != len({repr(line_id) for line_id in ids}):
        problems.add("line_items")
    return problems


def assert_within_bounds(order: MicroserviceOrder) -> None:
    body = order.model_dump()
    assert contract_problems(body, order.id) == set(), body
    assert type(body["revision"]) in (str, int)


# --- generated answers ----------------------------------------------------------------------

CLEAN_CHARS = st.characters(exclude_categories=("Cc", "Cs"))
ANY_CHARS = st.characters(exclude_categories=())  # lone surrogates included


def texts(max_chars: int) -> st.SearchStrategy[str]:
    return st.text(CLEAN_CHARS, min_size=1, max_size=max_chars)


revisions = st.one_of(texts(64), st.integers(min_value=-(10**62), max_value=10**63))


@st.composite
def valid_lines(draw: st.DrawFn) -> list[dict[str, Any]]:
    line = st.fixed_dictionaries(
        {
            "id": texts(128),
            "offer_id": texts(128),
            "sku": texts(128),
            "quantity": st.integers(1, MAX_QUANTITY),
        }
    )
    return draw(st.lists(line, min_size=1, max_size=5, unique_by=lambda line: line["id"]))


@st.composite
def valid_orders(draw: st.DrawFn, order_id: str | None = ORDER_ID) -> dict[str, Any]:
    return {
        "id": draw(texts(128)) if order_id is None else order_id,
        "account_name": draw(st.none() | texts(128)),
        "revision": draw(revisions),
        "status": draw(st.sampled_from(ORDER_STATUSES)),
        "fulfillment_status": draw(texts(32)),
        "line_items": draw(valid_lines()),
    }


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(ANY_CHARS, max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

MISSING = object()


@st.composite
def hostile_values(draw: st.DrawFn) -> object:
    """A value that is often, not always, wrong wherever it lands."""
    return draw(
        st.one_of(
            st.sampled_from([MISSING, "", [], {}]),
            st.sampled_from([32, 33, 64, 65, 128, 129, 500]).flatmap(  # either side of a column
                lambda size: st.text(CLEAN_CHARS, min_size=size, max_size=size)
            ),
            st.text(ANY_CHARS, min_size=1, max_size=10).map(lambda t: t + "\x00"),
            st.sampled_from(["a\nb", "\x1b[31m", "\x7f", "\x85", "\ud800", "x\udfff"]),
            st.integers(max_value=0),
            st.integers(min_value=MAX_QUANTITY, max_value=MAX_QUANTITY + 2),
            st.integers(min_value=10**6, max_value=10**80),
            st.booleans(),
            st.floats(allow_nan=False, allow_infinity=False),
            st.sampled_from(ORDER_STATUSES),
            json_values,
        )
    )


COLUMN_LIMITS = {"id": 128, "account_name": 128, "offer_id": 128, "sku": 128}
COLUMN_LIMITS |= {"fulfillment_status": 32, "revision": 64}
ORDER_FIELDS = ("id", "account_name", "revision", "status", "fulfillment_status", "line_items")
LINE_FIELDS = ("id", "offer_id", "sku", "quantity")


def boundary_values(field: str) -> st.SearchStrategy[object]:
    """Values on either side of the bound of ``field``."""
    if field in COLUMN_LIMITS:
        limit = COLUMN_LIMITS[field]
        return st.sampled_from([0, 1, limit, limit + 1]).flatmap(
            lambda size: st.text(CLEAN_CHARS, min_size=size, max_size=size)
        )
    return st.sampled_from(
        {
            "quantity": [0, 1, -1, MAX_QUANTITY, MAX_QUANTITY + 1, 2**31, 10**30, 2.0, "2"],
            "status": [*ORDER_STATUSES, "PAID", "bought", ""],
            "line_items": [[], {}, None, [{}], [None]],
        }[field]
    )


@st.composite
def near_valid_orders(draw: st.DrawFn) -> dict[str, Any]:
    """A valid order with one field (of the order or of one line) changed, or lines doubled."""
    order = draw(valid_orders())
    lines = order["line_items"]
    scope = draw(st.sampled_from(["order", "line", "duplicate"]))
    if scope == "duplicate":
        lines.insert(draw(st.integers(0, len(lines))), dict(draw(st.sampled_from(lines))))
        return order
    target = order if scope == "order" else draw(st.sampled_from(lines))
    field = draw(st.sampled_from(ORDER_FIELDS if scope == "order" else LINE_FIELDS))
    value = draw(boundary_values(field) | hostile_values())
    if value is MISSING:
        del target[field]
    else:
        target[field] = value
    return order


@st.composite
def padded_orders(draw: st.DrawFn) -> dict[str, Any]:
    """A valid order with an ignored field that takes it to about the size cap, or past it."""
    order = draw(valid_orders())
    size = len(json.dumps(order))
    order["padding"] = "x" * max(0, CAP - size + draw(st.integers(-20, 20)))
    return order


@dataclass(frozen=True)
class Answer:
    """One generated answer: what was sent, and the structure it encodes (when JSON)."""

    status: int
    body: bytes
    headers: dict[str, str]
    structure: object = MISSING
    decoded_size: int = 0


def encoded(value: object, *, ascii_only: bool) -> bytes:
    text = json.dumps(value, ensure_ascii=ascii_only)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only the escaped form is UTF-8
        return json.dumps(value).encode("ascii")


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    """Valid orders, near-valid ones, other JSON, bytes; any status; gzip or not."""
    kind = draw(st.sampled_from(["valid", "padded", "near", "near", "json", "bytes", "truncated"]))
    structure: object = MISSING
    if kind in ("valid", "padded", "near", "json"):
        strategy = {
            "valid": valid_orders(),
            "padded": padded_orders(),
            "near": near_valid_orders(),
            "json": json_values,
        }
        structure = draw(strategy[kind])
        body = encoded(structure, ascii_only=draw(st.booleans()))
    elif kind == "truncated":
        whole = encoded(draw(valid_orders()), ascii_only=True)
        body = whole[: draw(st.integers(0, len(whole) - 1))]
    else:
        body = draw(st.binary(max_size=300))
    status = draw(
        st.sampled_from([200] * 6 + [201, 204, 301, 304, 400, 404, 409, 422, 429, 500, 503])
        | st.integers(200, 599)
    )
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        headers["Retry-After"] = draw(st.sampled_from(["1", "2.5", "-1", "nan", "soon", "1e400"]))
    decoded_size = len(body)
    if draw(st.integers(0, 4)) == 0:
        headers["Content-Encoding"] = "gzip"
        if draw(st.integers(0, 3)):  # otherwise: claims gzip, is not
            body = gzip.compress(body)
        else:
            structure, decoded_size = MISSING, -1
    return Answer(status, body, headers, structure, decoded_size)


# --- (a) whatever the answer, one usable order or one clear error ---------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[MicroserviceClient]:
    with MicroserviceClient(BASE_URL, timeout_s=1.0, max_response_bytes=CAP) as microservice:
        yield microservice


@pytest.fixture(scope="module")
def roomy_client() -> Iterator[MicroserviceClient]:
    with MicroserviceClient(BASE_URL, timeout_s=1.0) as microservice:  # the default 1 MiB cap
        yield microservice


def answered(client: MicroserviceClient, answer: Answer) -> MicroserviceOrder | MicroserviceError:
    with responses.RequestsMock() as mock:
        mock.get(ORDER_URL, body=answer.body, status=answer.status, headers=answer.headers)
        try:
            return client.get_order(ORDER_ID)
        except MicroserviceError as exc:  # anything else fails the test
            return exc


PATH = re.compile(r"(?:contract: |; )(\(body\)|[a-z_]+(?:\.\d+(?:\.[a-z_]+)?)?): ")


def named_paths(message: str) -> set[str]:
    return set(PATH.findall(message))


def assert_one_clear_line(message: str) -> None:
    assert message, "empty message"
    assert len(message.splitlines()) == 1, repr(message)
    assert message.isprintable(), repr(message)
    assert message == message.strip(), repr(message)


def assert_names_what_was_wrong(error: MicroserviceError, answer: Answer) -> None:
    message = str(error)
    assert_one_clear_line(message)
    if isinstance(error, OrderNotFound):
        assert answer.status == 404
    elif isinstance(error, MicroserviceRateLimited):
        assert answer.status == 429 and "HTTP 429" in message
    elif isinstance(error, MicroserviceServerError):
        assert answer.status >= 500 and f"HTTP {answer.status}" in message
    elif isinstance(error, RevisionConflict):
        assert answer.status == 409 and "HTTP 409" in message
    elif isinstance(error, UnprocessableRequest):
        assert 400 <= answer.status < 500 and f"HTTP {answer.status}" in message
    elif isinstance(error, ContractViolation):
        assert (
            named_paths(message)
            or "not valid JSON: " in message
            or f"response larger than {CAP} bytes" in message
            or "body cannot be decoded: " in message
            or f"unexpected GET /v1/orders/{ORDER_ID}: HTTP {answer.status}" in message
        ), message
    else:  # a transport error: responses refuses a body on 204/304
        assert answer.status in (204, 304) or 100 <= answer.status < 200, message


def assert_agrees_with_the_contract(
    outcome: MicroserviceOrder | MicroserviceError, answer: Answer, cap: int = CAP
) -> None:
    """For a 200 carrying JSON within the cap: refused exactly when contract_problems says so,
    naming only fields it flags, at least one of them."""
    if answer.status != 200 or answer.structure is MISSING or answer.decoded_size > cap:
        return
    expected = contract_problems(answer.structure)
    if not expected:
        assert isinstance(outcome, MicroserviceOrder), outcome
        assert outcome == MicroserviceOrder.model_validate(answer.structure)
        assert type(outcome.revision) is type(answer.structure["revision"])  # type: ignore[index]
        return
    assert isinstance(outcome, ContractViolation), (expected, outcome)
    named = named_paths(str(outcome))
    assert named & expected, (expected, str(outcome))
    truncated = str(outcome).endswith("…")
    assert truncated or named <= expected, (expected, str(outcome))


@settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(answer=answers())
def test_any_answer_gives_a_bounded_order_or_one_clear_error(
    client: MicroserviceClient, answer: Answer
) -> None:
    outcome = answered(client, answer)
    event(f"outcome: {type(outcome).__name__}")  # shown by --hypothesis-show-statistics

    if isinstance(outcome, MicroserviceOrder):
        assert answer.status == 200
        assert answer.decoded_size <= CAP
        assert_within_bounds(outcome)
    else:
        assert_names_what_was_wrong(outcome, answer)
    if answer.status == 200 and answer.decoded_size > CAP:
        assert isinstance(outcome, ContractViolation), outcome
        assert str(outcome).endswith(f"response larger than {CAP} bytes"), str(outcome)
    assert_agrees_with_the_contract(outcome, answer)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order=near_valid_orders())
def test_a_near_valid_order_is_refused_naming_the_changed_field(
    roomy_client: MicroserviceClient, order: dict[str, Any]
) -> None:
    body = encoded(order, ascii_only=True)
    answer = Answer(200, body, {}, order, len(body))
    outcome = answered(roomy_client, answer)
    event(f"outcome: {type(outcome).__name__}")

    assert_agrees_with_the_contract(outcome, answer, cap=DEFAULT_MAX_RESPONSE_BYTES)
    assert isinstance(outcome, MicroserviceOrder) or str(outcome).isprintable()


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order=valid_orders())
def test_a_valid_order_comes_back_as_sent(
    roomy_client: MicroserviceClient, order: dict[str, Any]
) -> None:
    with responses.RequestsMock() as mock:
        mock.get(ORDER_URL, body=encoded(order, ascii_only=False))
        received = roomy_client.get_order(ORDER_ID)

    assert received.model_dump() == order
    assert type(received.revision) is type(order["revision"])


# --- (b) honest orders stored in the fake come back equal over HTTP -------------------------


@st.composite
def fake_orders(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A revision form and a valid order the fake can store (its fulfillment statuses are
    Allegro's; an integer revision is >= 0, a string one only in string form)."""
    form = draw(st.sampled_from(["string", "integer"]))
    order = draw(valid_orders(order_id=None))
    order["fulfillment_status"] = draw(st.sampled_from(sorted(FULFILLMENT_STATUSES)))
    order["revision"] = draw(
        texts(64) if form == "string" else st.integers(min_value=0, max_value=10**63)
    )
    return form, order


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeMicroservice]:
    with FakeMicroservice() as started:
        yield started


@pytest.fixture(scope="module")
def fake_client(fake: FakeMicroservice) -> Iterator[MicroserviceClient]:
    with MicroserviceClient(fake.url, timeout_s=2.0) as microservice:
        yield microservice


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fake_orders())
def test_an_order_stored_in_the_fake_comes_back_equal_over_http(
    fake: FakeMicroservice, fake_client: MicroserviceClient, case: tuple[str, dict[str, Any]]
) -> None:
    form, order = case
    fake.set_revision_form(form)  # type: ignore[arg-type]  # one of the two, drawn above
    fake.add_order(order)

    received = fake_client.get_order(order["id"])
    fake_client.set_fulfillment_status(
        order["id"],
        status="SENT",
        expected_revision=received.revision,
        idempotency_key=str(uuid.uuid4()),
    )

    assert received.model_dump() == order
    assert type(received.revision) is type(order["revision"])
    assert fake.order(order["id"])["fulfillment_status"] == "SENT"

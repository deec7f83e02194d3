"""Unit tests of MicroserviceClient: every outcome of the contract, HTTP mocked by responses."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest
import requests
import responses

from stock_sync.adapters.marketplace_contract import (
    FULFILLMENT_STATUS_MAX_CHARS,
    TEXT_MAX_CHARS,
    MicroserviceOrder,
    OrderLineItem,
)
from stock_sync.adapters.microservice_client import MicroserviceClient
from stock_sync.adapters.models import PendingStockOperation, StockLevel, StockMovement
from stock_sync.domain import errors
from stock_sync.domain.revisions import Revision

E = TypeVar("E", bound=Exception)

BASE_URL = "http://microservice.test"
ORDER_URL = f"{BASE_URL}/v1/orders/o-1"
FULFILLMENT_URL = f"{ORDER_URL}/fulfillment"


def order_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "o-1",
        "account_name": "shop-a",
        "revision": 3,
        "status": "READY_FOR_PROCESSING",
        "fulfillment_status": "NEW",
        "line_items": [{"id": "li-1", "offer_id": "off-1", "sku": "SKU-1", "quantity": 2}],
    }
    body.update(changes)
    return body


def error_body(code: str, message: str, *, retryable: bool = False) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "retryable": retryable}}


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock() as mock:
        yield mock


@pytest.fixture
def client() -> Iterator[MicroserviceClient]:
    with MicroserviceClient(BASE_URL, timeout_s=5.0, connect_timeout_s=2.0) as microservice:
        yield microservice


def put_processing(client: MicroserviceClient) -> None:
    client.set_fulfillment_status(
        "o-1", status="PROCESSING", expected_revision=3, idempotency_key="op-1:sync"
    )


def get_error(client: MicroserviceClient, expected: type[E], match: str | None = None) -> E:
    """The error of ``expected`` type that GET of order o-1 raises (its message matching)."""
    with pytest.raises(expected, match=match) as caught:
        client.get_order("o-1")
    return caught.value


def put_error(client: MicroserviceClient, expected: type[E], match: str | None = None) -> E:
    """The error of ``expected`` type that the PUT of ``put_processing`` raises."""
    with pytest.raises(expected, match=match) as caught:
        put_processing(client)
    return caught.value


# --- GET /v1/orders/{id} ------------------------------------------------------------------


def test_parses_an_order_into_typed_line_items(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, json=order_body())

    order = client.get_order("o-1")

    assert order == MicroserviceOrder(
        id="o-1",
        account_name="shop-a",
        revision=3,
        status="READY_FOR_PROCESSING",
        fulfillment_status="NEW",
        line_items=[OrderLineItem(id="li-1", offer_id="off-1", sku="SKU-1", quantity=2)],
    )


def test_ignores_fields_the_contract_does_not_name(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    body = order_body(buyer={"login": "jan"})
    body["line_items"][0]["price"] = "12.50"
    mocked.get(ORDER_URL, json=body)

    assert client.get_order("o-1").line_items[0].sku == "SKU-1"


def test_accepts_an_order_without_an_account_name(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, json=order_body(account_name=None))

    assert client.get_order("o-1").account_name is None


def test_quotes_the_order_id_into_one_path_segment(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(re.compile(r".*/v1/orders/.*"), json=order_body(id="a/b c"))

    client.get_order("a/b c")

    assert mocked.calls[0].request.path_url == "/v1/orders/a%2Fb%20c"


@pytest.mark.parametrize("order_id", [".", "..", "a.b"])
def test_keeps_a_dot_order_id_in_its_path_segment(
    mocked: responses.RequestsMock, client: MicroserviceClient, order_id: str
) -> None:
    """URL normalisation would drop a "." or ".." segment (GET /v1/orders/.. asking for /v1/)."""
    mocked.get(re.compile(r".*"), json=order_body(id=order_id))
    mocked.put(re.compile(r".*"), status=204)

    client.get_order(order_id)
    client.set_fulfillment_status(
        order_id, status="PROCESSING", expected_revision=3, idempotency_key="k"
    )

    assert [call.request.path_url for call in mocked.calls] == [
        f"/v1/orders/{order_id}",
        f"/v1/orders/{order_id}/fulfillment",
    ]


def test_sends_the_connect_and_read_timeouts(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, json=order_body())

    client.get_order("o-1")

    sent_kwargs = mocked.calls[0].request.req_kwargs  # type: ignore[attr-defined]  # set by responses
    assert sent_kwargs["timeout"] == (2.0, 5.0)


def test_uses_a_session_passed_in_by_the_caller(mocked: responses.RequestsMock) -> None:
    session = requests.Session()
    session.headers["X-Trace"] = "t-1"
    mocked.get(ORDER_URL, json=order_body())

    with MicroserviceClient(BASE_URL, session=session) as microservice:
        microservice.get_order("o-1")

    assert mocked.calls[0].request.headers["X-Trace"] == "t-1"


def test_classifies_404_on_get_as_order_not_found(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, status=404, json=error_body("ORDER_NOT_FOUND", "no such order"))

    error = get_error(client, errors.OrderNotFound)

    assert (error.order_id, error.status_code, error.retryable) == ("o-1", 404, True)


def test_rejects_an_empty_order_id_without_calling_the_microservice(
    client: MicroserviceClient,
) -> None:
    with pytest.raises(errors.InvalidInput, match="order_id"):
        client.get_order("")


# --- transport failures ---------------------------------------------------------------------


def test_classifies_a_connection_error_as_unavailable(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, body=requests.ConnectionError("Connection refused"))

    assert get_error(client, errors.MicroserviceUnavailable, match="Connection refused").retryable


@pytest.mark.parametrize(
    "timeout", [requests.exceptions.ReadTimeout(), requests.exceptions.ConnectTimeout()]
)
def test_classifies_read_and_connect_timeouts_as_microservice_timeout(
    mocked: responses.RequestsMock, client: MicroserviceClient, timeout: Exception
) -> None:
    mocked.get(ORDER_URL, body=timeout)

    assert get_error(client, errors.MicroserviceTimeout, match="no answer within 5s").retryable


# --- error statuses -------------------------------------------------------------------------


def test_classifies_429_as_rate_limited_with_retry_after(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(
        ORDER_URL,
        status=429,
        headers={"Retry-After": "7"},
        json=error_body("RATE_LIMITED", "slow down", retryable=True),
    )

    error = get_error(client, errors.MicroserviceRateLimited, match="RATE_LIMITED: slow down")

    assert (error.retry_after_s, error.status_code) == (7.0, 429)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}],
    ids=["no Retry-After", "a Retry-After that is not a number of seconds"],
)
def test_classifies_429_as_rate_limited_without_a_delay_unless_told_in_seconds(
    mocked: responses.RequestsMock, client: MicroserviceClient, headers: dict[str, str]
) -> None:
    mocked.get(ORDER_URL, status=429, headers=headers)

    assert get_error(client, errors.MicroserviceRateLimited).retry_after_s is None


@pytest.mark.parametrize("status", [500, 502, 503])
def test_classifies_5xx_as_a_retryable_server_error(
    mocked: responses.RequestsMock, client: MicroserviceClient, status: int
) -> None:
    mocked.get(ORDER_URL, status=status, json=error_body("UPSTREAM", "allegro down"))

    error = get_error(
        client, errors.MicroserviceServerError, match=f"HTTP {status}: UPSTREAM: allegro"
    )

    assert (error.status_code, error.retryable, error.retry_after_s) == (status, True, None)


def test_keeps_the_retry_after_of_a_503(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, status=503, headers={"Retry-After": "1.5"})

    assert get_error(client, errors.MicroserviceServerError).retry_after_s == 1.5


@pytest.mark.parametrize(
    ("status", "code", "expected", "retryable"),
    [
        (409, "REVISION_CONFLICT", errors.RevisionConflict, True),
        (422, "INVALID_STATUS", errors.UnprocessableRequest, False),
    ],
)
def test_classifies_409_as_a_revision_conflict_and_422_as_a_permanent_refusal(
    mocked: responses.RequestsMock,
    client: MicroserviceClient,
    status: int,
    code: str,
    expected: type[errors.MicroserviceError],
    retryable: bool,
) -> None:
    mocked.put(FULFILLMENT_URL, status=status, json=error_body(code, "not this time"))

    error = put_error(client, expected, match=f"{code}: not this time")

    assert (error.status_code, error.retryable) == (status, retryable)


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_classifies_other_4xx_on_put_as_unprocessable(
    mocked: responses.RequestsMock, client: MicroserviceClient, status: int
) -> None:
    mocked.put(FULFILLMENT_URL, status=status)

    assert put_error(client, errors.UnprocessableRequest).status_code == status


def test_does_not_follow_redirects(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.put(FULFILLMENT_URL, status=302, headers={"Location": ORDER_URL})

    with pytest.raises(errors.ContractViolation, match=r"unexpected PUT \S+: HTTP 302"):
        put_processing(client)


def test_keeps_an_error_message_on_one_line(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, status=500, json=error_body("BOOM", "first line\nsecond line"))

    error = get_error(client, errors.MicroserviceServerError)

    assert "\n" not in str(error)
    assert "BOOM: first line second line" in str(error)


# --- broken answers -------------------------------------------------------------------------


def test_reports_malformed_json_as_a_contract_violation(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, body='{"id": "o-1", "line_items": [', content_type="application/json")

    error = get_error(client, errors.ContractViolation, match="not valid JSON")

    assert not error.retryable


def test_names_a_missing_field_in_the_contract_violation(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    body = order_body()
    del body["line_items"][0]["sku"]
    mocked.get(ORDER_URL, json=body)

    with pytest.raises(errors.ContractViolation, match=r"line_items\.0\.sku: Field required"):
        client.get_order("o-1")


def test_names_a_zero_quantity_in_the_contract_violation(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    body = order_body()
    body["line_items"][0]["quantity"] = 0
    mocked.get(ORDER_URL, json=body)

    error = get_error(client, errors.ContractViolation)

    assert str(error) == (
        "microservice response breaks the contract: "
        "line_items.0.quantity: Input should be greater than or equal to 1"
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"status": "PAID"}, "status"),
        ({"revision": True}, "revision"),
        ({"line_items": None}, "line_items"),
    ],
)
def test_names_a_field_with_a_value_outside_the_contract(
    mocked: responses.RequestsMock, client: MicroserviceClient, changes: Any, field: str
) -> None:
    mocked.get(ORDER_URL, json=order_body(**changes))

    with pytest.raises(errors.ContractViolation, match=f"breaks the contract: {field}: "):
        client.get_order("o-1")


def test_rejects_an_answer_about_another_order(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, json=order_body(id="o-2"))

    with pytest.raises(errors.ContractViolation, match="id: asked for order 'o-1', got 'o-2'"):
        client.get_order("o-1")


# --- PUT /v1/orders/{id}/fulfillment ------------------------------------------------------


def test_put_sends_the_idempotency_key_and_the_json_body(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.put(FULFILLMENT_URL, status=204)

    put_processing(client)

    request = mocked.calls[0].request
    assert request.headers["Idempotency-Key"] == "op-1:sync"
    assert request.body is not None
    assert json.loads(request.body) == {"status": "PROCESSING", "expected_revision": 3}


def test_put_accepts_200_as_well_as_204(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.put(FULFILLMENT_URL, status=200, json={})

    put_processing(client)

    assert len(mocked.calls) == 1


def test_put_does_not_retry_by_itself(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.put(FULFILLMENT_URL, status=503)

    with pytest.raises(errors.MicroserviceServerError):
        put_processing(client)

    assert len(mocked.calls) == 1


def test_put_rejects_a_missing_idempotency_key_without_calling_the_microservice(
    client: MicroserviceClient,
) -> None:
    with pytest.raises(errors.InvalidInput, match="idempotency_key"):
        client.set_fulfillment_status(
            "o-1", status="PROCESSING", expected_revision=3, idempotency_key=""
        )


def test_refuses_a_base_url_that_is_not_http() -> None:
    with pytest.raises(errors.InvalidInput, match="base_url"):
        MicroserviceClient("microservice.test:8765")


# --- opaque revisions -----------------------------------------------------------------------


@pytest.mark.parametrize("revision", ["d8e8fca2", "1", 3, 0, -4, 2**63, "x" * 64])
def test_keeps_the_revision_exactly_as_received_type_included(
    mocked: responses.RequestsMock, client: MicroserviceClient, revision: Revision
) -> None:
    mocked.get(ORDER_URL, json=order_body(revision=revision))

    received = client.get_order("o-1").revision

    assert (type(received), received) == (type(revision), revision)


@pytest.mark.parametrize("revision", ["d8e8fca2", "1", 1, 7])
def test_put_echoes_the_revision_unchanged(
    mocked: responses.RequestsMock, client: MicroserviceClient, revision: Revision
) -> None:
    mocked.put(FULFILLMENT_URL, status=204)

    client.set_fulfillment_status(
        "o-1", status="PROCESSING", expected_revision=revision, idempotency_key="k"
    )

    sent = json.loads(mocked.calls[0].request.body or b"")["expected_revision"]
    assert (type(sent), sent) == (type(revision), revision)


def test_a_revision_read_is_the_revision_sent(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, json=order_body(revision="d8e8fca2"))
    mocked.put(FULFILLMENT_URL, status=204)

    order = client.get_order("o-1")
    client.set_fulfillment_status(
        "o-1", status="PROCESSING", expected_revision=order.revision, idempotency_key="k"
    )

    assert b'"expected_revision": "d8e8fca2"' in (mocked.calls[1].request.body or b"")


@pytest.mark.parametrize(
    ("revision", "problem"),
    [
        (True, "must be a string or an integer, got bool"),
        (1.0, "must be a string or an integer, got float"),
        (None, "must be a string or an integer, got NoneType"),
        ([1], "must be a string or an integer, got list"),
        ("", "must not be empty"),
        ("x" * 65, "must have at most 64 characters"),
        (10**64, "must have at most 64 characters"),
        ("d8e8\nfca2", "must not contain a control character U+000A at index 4"),
        ("\x00", "must not contain a control character U+0000 at index 0"),
        ("ab\ud800", "must not contain a lone surrogate U+D800 at index 2"),
    ],
)
def test_refuses_a_revision_outside_the_contract(
    mocked: responses.RequestsMock, client: MicroserviceClient, revision: Any, problem: str
) -> None:
    mocked.get(ORDER_URL, body=json.dumps(order_body(revision=revision)))

    error = get_error(client, errors.ContractViolation)

    assert str(error) == f"microservice response breaks the contract: revision: {problem}"


@pytest.mark.parametrize("revision", [True, 1.5, "", "x" * 65, "a\x1bb", None])
def test_put_refuses_a_revision_outside_the_contract_without_sending(
    client: MicroserviceClient, revision: Any
) -> None:
    with pytest.raises(errors.InvalidInput, match=r"^expected_revision must"):
        client.set_fulfillment_status(
            "o-1", status="PROCESSING", expected_revision=revision, idempotency_key="k"
        )


# --- every field is untrusted ---------------------------------------------------------------


def contract_violation(
    mocked: responses.RequestsMock, client: MicroserviceClient, body: Any
) -> str:
    """The message of the errors.ContractViolation that GET answered with ``body`` raises."""
    mocked.get(ORDER_URL, body=body if isinstance(body, bytes) else json.dumps(body))
    error = get_error(client, errors.ContractViolation)
    message = str(error)
    assert len(message.splitlines()) == 1
    assert message.isprintable()
    return message


def with_line(**changes: Any) -> dict[str, Any]:
    line = {"id": "li-1", "offer_id": "off-1", "sku": "SKU-1", "quantity": 2, **changes}
    return order_body(line_items=[{"id": "li-0", "offer_id": "o", "sku": "S", "quantity": 1}, line])


@pytest.mark.parametrize("quantity", [0, -1, 1_000_001, 10**30, 2**31])
def test_refuses_a_quantity_outside_one_to_the_maximum(
    mocked: responses.RequestsMock, client: MicroserviceClient, quantity: int
) -> None:
    message = contract_violation(mocked, client, with_line(quantity=quantity))

    assert message.startswith("microservice response breaks the contract: line_items.1.quantity:")


@pytest.mark.parametrize("quantity", ["2", 2.0, True, None, "1e30"])
def test_refuses_a_quantity_that_is_not_an_integer(
    mocked: responses.RequestsMock, client: MicroserviceClient, quantity: Any
) -> None:
    message = contract_violation(mocked, client, with_line(quantity=quantity))

    assert "line_items.1.quantity: Input should be a valid integer" in message


def test_accepts_the_largest_quantity_and_takes_the_maximum_from_the_constructor(
    mocked: responses.RequestsMock,
) -> None:
    mocked.get(ORDER_URL, json=with_line(quantity=5))
    mocked.get(ORDER_URL, json=with_line(quantity=6))

    with MicroserviceClient(BASE_URL, max_line_quantity=5) as microservice:
        assert microservice.get_order("o-1").line_items[1].quantity == 5
        with pytest.raises(
            errors.ContractViolation,
            match=r"line_items\.1\.quantity: Input should be less than or equal to 5$",
        ):
            microservice.get_order("o-1")


def test_accepts_a_quantity_of_a_million_by_default(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, json=with_line(quantity=1_000_000))

    assert client.get_order("o-1").line_items[1].quantity == 1_000_000


@pytest.mark.parametrize(
    ("field", "limit"),
    [
        ("account_name", 128),
        ("fulfillment_status", 32),
    ],
)
def test_refuses_an_order_string_longer_than_its_column(
    mocked: responses.RequestsMock, client: MicroserviceClient, field: str, limit: int
) -> None:
    mocked.get(ORDER_URL, json=order_body(**{field: "x" * limit}))
    assert getattr(client.get_order("o-1"), field) == "x" * limit

    message = contract_violation(mocked, client, order_body(**{field: "x" * (limit + 1)}))

    assert message.endswith(f": {field}: String should have at most {limit} characters")


def test_refuses_an_order_id_longer_than_its_column(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    long_id = "o" * 129
    mocked.get(f"{BASE_URL}/v1/orders/{long_id}", json=order_body(id=long_id))

    with pytest.raises(
        errors.ContractViolation, match=r"id: String should have at most 128 characters$"
    ):
        client.get_order(long_id)


@pytest.mark.parametrize("field", ["id", "offer_id", "sku"])
def test_refuses_a_line_string_longer_than_its_column(
    mocked: responses.RequestsMock, client: MicroserviceClient, field: str
) -> None:
    message = contract_violation(mocked, client, with_line(**{field: "x" * 129}))

    assert message.endswith(f": line_items.1.{field}: String should have at most 128 characters")


@pytest.mark.parametrize("field", ["id", "offer_id", "sku"])
def test_refuses_an_empty_line_string(
    mocked: responses.RequestsMock, client: MicroserviceClient, field: str
) -> None:
    message = contract_violation(mocked, client, with_line(**{field: ""}))

    assert f"line_items.1.{field}: String should have at least 1 character" in message


@pytest.mark.parametrize(
    ("char", "shown"),
    [
        ("\x00", "control character U+0000"),
        ("\n", "control character U+000A"),
        ("\x1b", "control character U+001B"),
        ("\x7f", "control character U+007F"),
        ("\x85", "control character U+0085"),
        ("\ud800", "lone surrogate U+D800"),
        ("\udfff", "lone surrogate U+DFFF"),
    ],
)
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (lambda v: order_body(account_name=v), "account_name"),
        (lambda v: order_body(fulfillment_status=v), "fulfillment_status"),
        (lambda v: with_line(id=v), "line_items.1.id"),
        (lambda v: with_line(offer_id=v), "line_items.1.offer_id"),
        (lambda v: with_line(sku=v), "line_items.1.sku"),
    ],
)
def test_refuses_a_control_character_or_lone_surrogate_in_any_string(
    mocked: responses.RequestsMock,
    client: MicroserviceClient,
    char: str,
    shown: str,
    changes: Any,
    field: str,
) -> None:
    message = contract_violation(mocked, client, changes(f"ab{char}c"))

    assert message.endswith(f": {field}: must not contain a {shown} at index 2")


def test_refuses_a_control_character_in_the_order_id(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(re.compile(r".*/v1/orders/.*"), body=json.dumps(order_body(id="o-1\x1b[2J")))

    with pytest.raises(
        errors.ContractViolation, match=r"id: must not contain a control character U\+001B"
    ):
        client.get_order("o-1\x1b[2J")


def test_accepts_printable_unicode(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, json=with_line(sku="ŻÓŁW-🐢", offer_id="оффер"))

    assert client.get_order("o-1").line_items[1].sku == "ŻÓŁW-🐢"


def test_refuses_duplicate_line_item_ids(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    message = contract_violation(mocked, client, with_line(id="li-0"))

    assert message.endswith(": line_items: line item id 'li-0' appears twice, at items 0 and 1")


def test_refuses_an_empty_line_items_list(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    message = contract_violation(mocked, client, order_body(line_items=[]))

    assert "line_items: List should have at least 1 item" in message


@pytest.mark.parametrize("status", ["PAID", "ready_for_processing", "", None, 1])
def test_refuses_an_unknown_order_status(
    mocked: responses.RequestsMock, client: MicroserviceClient, status: Any
) -> None:
    message = contract_violation(mocked, client, order_body(status=status))

    assert ": status: Input should be 'BOUGHT', 'FILLED_IN'" in message


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"id": "o-1", "line_items": [', "not valid JSON: Expecting value"),
        (b"\xff\xfe{}", "not valid JSON: not UTF-8 at byte 0"),
        (b'{"quantity": NaN}', "not valid JSON: NaN is not a JSON value"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON: nested too deeply"),
        (b"1" * 5000, "not valid JSON: Exceeds the limit"),
        (b"", "not valid JSON"),
    ],
)
def test_reports_a_body_that_is_not_json_naming_why(
    mocked: responses.RequestsMock, client: MicroserviceClient, body: bytes, problem: str
) -> None:
    assert problem in contract_violation(mocked, client, body)


@pytest.mark.parametrize("body", [[], "o-1", None, 3])
def test_reports_a_json_body_that_is_not_an_object(
    mocked: responses.RequestsMock, client: MicroserviceClient, body: Any
) -> None:
    message = contract_violation(mocked, client, body)

    assert "breaks the contract: (body): Input should be a valid dictionary" in message


def test_reports_every_broken_field_on_one_line(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    body = with_line(quantity=0, sku="a\nb")
    body["status"] = "PAID"

    message = contract_violation(mocked, client, body)

    for field in ("status", "line_items.1.sku", "line_items.1.quantity"):
        assert f"{field}: " in message


def test_escapes_control_characters_of_an_error_body_into_the_message(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, status=500, json=error_body("BO\x1b[31mOM", "bad\x00\ud800 news"))

    error = get_error(client, errors.MicroserviceServerError)

    assert str(error).endswith(r"HTTP 500: BO\x1b[31mOM: bad\x00\ud800 news")
    assert str(error).isprintable()


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        json.dumps({"error": {"code": [[[]]], "message": {"deep": 1}}}).encode(),
        b"\xff",
    ],
)
def test_an_odd_error_body_leaves_the_status_classification_alone(
    mocked: responses.RequestsMock, client: MicroserviceClient, body: bytes
) -> None:
    mocked.get(ORDER_URL, status=503, body=body)

    with pytest.raises(errors.MicroserviceServerError, match=r"HTTP 503$"):
        client.get_order("o-1")


# --- size of the answer ---------------------------------------------------------------------


def test_refuses_an_answer_larger_than_the_cap(mocked: responses.RequestsMock) -> None:
    body = json.dumps(order_body(padding="x" * 2000)).encode()
    mocked.get(ORDER_URL, body=body)

    with (
        MicroserviceClient(BASE_URL, max_response_bytes=1000) as microservice,
        pytest.raises(errors.ContractViolation) as caught,
    ):
        microservice.get_order("o-1")

    assert str(caught.value) == (
        "microservice response breaks the contract: response larger than 1000 bytes"
    )


def test_accepts_an_answer_of_exactly_the_cap(mocked: responses.RequestsMock) -> None:
    body = json.dumps(order_body()).encode()
    mocked.get(ORDER_URL, body=body)

    with MicroserviceClient(BASE_URL, max_response_bytes=len(body)) as microservice:
        assert microservice.get_order("o-1").id == "o-1"


def test_counts_the_cap_on_the_decoded_body(mocked: responses.RequestsMock) -> None:
    bomb = gzip.compress(b" " * 5_000_000)  # valid JSON whitespace, about 5 KB on the wire
    mocked.get(ORDER_URL, body=bomb, headers={"Content-Encoding": "gzip"})

    with (
        MicroserviceClient(BASE_URL, max_response_bytes=100_000) as microservice,
        pytest.raises(errors.ContractViolation, match="response larger than 100000 bytes"),
    ):
        microservice.get_order("o-1")


def test_decodes_a_gzip_answer_within_the_cap(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    body = gzip.compress(json.dumps(order_body()).encode())
    mocked.get(ORDER_URL, body=body, headers={"Content-Encoding": "gzip"})

    assert client.get_order("o-1").id == "o-1"


def test_reports_a_body_that_cannot_be_decoded(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, body=b"not gzip at all", headers={"Content-Encoding": "gzip"})

    with pytest.raises(errors.ContractViolation, match="body cannot be decoded"):
        client.get_order("o-1")


def test_a_large_error_body_still_classifies_by_status(mocked: responses.RequestsMock) -> None:
    mocked.get(ORDER_URL, status=503, body=b"<html>" + b"x" * 5000)

    with (
        MicroserviceClient(BASE_URL, max_response_bytes=1000) as microservice,
        pytest.raises(errors.MicroserviceServerError, match=r"HTTP 503$"),
    ):
        microservice.get_order("o-1")


@pytest.mark.parametrize("status", [200, 204])
def test_a_put_answered_with_an_undecodable_body_still_succeeded(
    mocked: responses.RequestsMock, client: MicroserviceClient, status: int
) -> None:
    mocked.put(FULFILLMENT_URL, status=status, body=b"", headers={"Content-Encoding": "gzip"})
    mocked.put(FULFILLMENT_URL, status=200, body=b"not gzip", headers={"Content-Encoding": "gzip"})

    put_processing(client)
    put_processing(client)


def test_an_undecodable_error_body_still_classifies_by_status(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.put(FULFILLMENT_URL, status=409, body=b"not gzip", headers={"Content-Encoding": "gzip"})

    with pytest.raises(errors.RevisionConflict, match=r"HTTP 409$"):
        put_processing(client)


def test_a_put_answered_200_with_a_large_body_still_succeeded(
    mocked: responses.RequestsMock,
) -> None:
    mocked.put(FULFILLMENT_URL, status=200, body=b"x" * 5000)

    with MicroserviceClient(BASE_URL, max_response_bytes=1000) as microservice:
        put_processing(microservice)


# --- constructor ----------------------------------------------------------------------------


def test_the_default_deadline_is_three_read_timeouts_capped_at_thirty_seconds() -> None:
    assert MicroserviceClient(BASE_URL, timeout_s=5).deadline_s == 15
    assert MicroserviceClient(BASE_URL, timeout_s=0.2).deadline_s == pytest.approx(0.6)
    assert MicroserviceClient(BASE_URL, timeout_s=20).deadline_s == 30
    assert MicroserviceClient(BASE_URL, timeout_s=45).deadline_s == 45  # never below a read
    assert MicroserviceClient(BASE_URL, deadline_s=2).deadline_s == 2


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"deadline_s": 0}, "deadline_s"),
        ({"deadline_s": float("inf")}, "deadline_s"),
        ({"deadline_s": True}, "deadline_s"),
        ({"max_response_bytes": 0}, "max_response_bytes"),
        ({"max_line_quantity": 0}, "max_line_quantity"),
        ({"max_line_quantity": 2**31}, "max_line_quantity"),
        ({"max_line_quantity": 1.5}, "max_line_quantity"),
    ],
)
def test_refuses_a_bad_bound(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(errors.InvalidInput, match=f"^{name} must"):
        MicroserviceClient(BASE_URL, **kwargs)


def test_the_string_bounds_match_the_database_columns() -> None:
    operations = PendingStockOperation.__table__.c
    lengths = {
        "order_id": operations.order_id.type.length,
        "account_name": operations.account_name.type.length,
        "fulfillment_status": operations.fulfillment_status_before_sync.type.length,
        "line_item_id": StockMovement.__table__.c.line_item_id.type.length,
        "sku": StockLevel.__table__.c.sku.type.length,
    }

    assert lengths == {
        "order_id": TEXT_MAX_CHARS,
        "account_name": TEXT_MAX_CHARS,
        "fulfillment_status": FULFILLMENT_STATUS_MAX_CHARS,
        "line_item_id": TEXT_MAX_CHARS,
        "sku": TEXT_MAX_CHARS,
    }


NO_DEADLINE_THREAD_UNTIL_A_REQUEST = """
import threading

from stock_sync.adapters import deadline_session, marketplace_contract, microservice_client
from stock_sync.domain.errors import OrderNotFound
from stock_sync_fake import FakeMicroservice


def watchdogs():
    return [t.name for t in threading.enumerate() if t.name == "microservice-deadlines"]


print("after import:", watchdogs(), deadline_session._WATCHDOG)
with FakeMicroservice().start() as fake, microservice_client.MicroserviceClient(fake.url) as c:
    print("after a client:", watchdogs())
    try:
        c.get_order("missing")
    except OrderNotFound:
        pass
    print("after a request:", watchdogs())
"""


def test_the_deadline_watchdog_starts_with_the_first_request_not_at_import() -> None:
    ran = subprocess.run(
        [sys.executable, "-c", NO_DEADLINE_THREAD_UNTIL_A_REQUEST],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert ran.stdout.splitlines() == [
        "after import: [] None",
        "after a client: []",
        "after a request: ['microservice-deadlines']",
    ]

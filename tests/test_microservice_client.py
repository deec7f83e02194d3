"""Unit tests of MicroserviceClient: every outcome of the contract, HTTP mocked by responses."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import responses

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
from stock_sync.microservice_client import MicroserviceClient, MicroserviceOrder, OrderLineItem

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

    with pytest.raises(OrderNotFound) as caught:
        client.get_order("o-1")

    assert (caught.value.order_id, caught.value.status_code) == ("o-1", 404)
    assert caught.value.retryable


def test_rejects_an_empty_order_id_without_calling_the_microservice(
    client: MicroserviceClient,
) -> None:
    with pytest.raises(InvalidInput, match="order_id"):
        client.get_order("")


# --- transport failures ---------------------------------------------------------------------


def test_classifies_a_connection_error_as_unavailable(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, body=requests.ConnectionError("Connection refused"))

    with pytest.raises(MicroserviceUnavailable, match="Connection refused") as caught:
        client.get_order("o-1")

    assert caught.value.retryable


@pytest.mark.parametrize(
    "timeout", [requests.exceptions.ReadTimeout(), requests.exceptions.ConnectTimeout()]
)
def test_classifies_read_and_connect_timeouts_as_microservice_timeout(
    mocked: responses.RequestsMock, client: MicroserviceClient, timeout: Exception
) -> None:
    mocked.get(ORDER_URL, body=timeout)

    with pytest.raises(MicroserviceTimeout, match="no answer within 5s") as caught:
        client.get_order("o-1")

    assert caught.value.retryable


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

    with pytest.raises(MicroserviceRateLimited) as caught:
        client.get_order("o-1")

    assert caught.value.retry_after_s == 7.0
    assert caught.value.status_code == 429
    assert "RATE_LIMITED: slow down" in str(caught.value)


def test_classifies_429_without_retry_after_as_rate_limited_without_a_delay(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, status=429)

    with pytest.raises(MicroserviceRateLimited) as caught:
        client.get_order("o-1")

    assert caught.value.retry_after_s is None


def test_ignores_a_retry_after_that_is_not_a_number_of_seconds(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, status=429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})

    with pytest.raises(MicroserviceRateLimited) as caught:
        client.get_order("o-1")

    assert caught.value.retry_after_s is None


@pytest.mark.parametrize("status", [500, 502, 503])
def test_classifies_5xx_as_a_retryable_server_error(
    mocked: responses.RequestsMock, client: MicroserviceClient, status: int
) -> None:
    mocked.get(ORDER_URL, status=status, json=error_body("UPSTREAM", "allegro down"))

    with pytest.raises(MicroserviceServerError) as caught:
        client.get_order("o-1")

    assert caught.value.status_code == status
    assert caught.value.retryable
    assert caught.value.retry_after_s is None
    assert f"HTTP {status}: UPSTREAM: allegro down" in str(caught.value)


def test_keeps_the_retry_after_of_a_503(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, status=503, headers={"Retry-After": "1.5"})

    with pytest.raises(MicroserviceServerError) as caught:
        client.get_order("o-1")

    assert caught.value.retry_after_s == 1.5


def test_classifies_409_as_revision_conflict(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.put(FULFILLMENT_URL, status=409, json=error_body("REVISION_CONFLICT", "stale"))

    with pytest.raises(RevisionConflict, match="REVISION_CONFLICT: stale") as caught:
        put_processing(client)

    assert caught.value.status_code == 409
    assert caught.value.retryable


def test_classifies_422_as_a_permanent_unprocessable_request(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.put(FULFILLMENT_URL, status=422, json=error_body("INVALID_STATUS", "no such status"))

    with pytest.raises(UnprocessableRequest, match="INVALID_STATUS: no such status") as caught:
        put_processing(client)

    assert caught.value.status_code == 422
    assert not caught.value.retryable


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_classifies_other_4xx_on_put_as_unprocessable(
    mocked: responses.RequestsMock, client: MicroserviceClient, status: int
) -> None:
    mocked.put(FULFILLMENT_URL, status=status)

    with pytest.raises(UnprocessableRequest) as caught:
        put_processing(client)

    assert caught.value.status_code == status


def test_does_not_follow_redirects(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.put(FULFILLMENT_URL, status=302, headers={"Location": ORDER_URL})

    with pytest.raises(ContractViolation, match=r"unexpected PUT \S+: HTTP 302"):
        put_processing(client)


def test_keeps_an_error_message_on_one_line(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, status=500, json=error_body("BOOM", "first line\nsecond line"))

    with pytest.raises(MicroserviceServerError) as caught:
        client.get_order("o-1")

    assert "\n" not in str(caught.value)
    assert "BOOM: first line second line" in str(caught.value)


# --- broken answers -------------------------------------------------------------------------


def test_reports_malformed_json_as_a_contract_violation(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, body='{"id": "o-1", "line_items": [', content_type="application/json")

    with pytest.raises(ContractViolation, match="not valid JSON") as caught:
        client.get_order("o-1")

    assert not caught.value.retryable


def test_names_a_missing_field_in_the_contract_violation(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    body = order_body()
    del body["line_items"][0]["sku"]
    mocked.get(ORDER_URL, json=body)

    with pytest.raises(ContractViolation, match=r"line_items\.0\.sku: Field required"):
        client.get_order("o-1")


def test_names_a_zero_quantity_in_the_contract_violation(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    body = order_body()
    body["line_items"][0]["quantity"] = 0
    mocked.get(ORDER_URL, json=body)

    with pytest.raises(ContractViolation) as caught:
        client.get_order("o-1")

    assert str(caught.value) == (
        "microservice response breaks the contract: "
        "line_items.0.quantity: Input should be greater than or equal to 1"
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"status": "PAID"}, "status"),
        ({"revision": "3"}, "revision"),
        ({"line_items": None}, "line_items"),
    ],
)
def test_names_a_field_with_a_value_outside_the_contract(
    mocked: responses.RequestsMock, client: MicroserviceClient, changes: Any, field: str
) -> None:
    mocked.get(ORDER_URL, json=order_body(**changes))

    with pytest.raises(ContractViolation, match=f"breaks the contract: {field}: "):
        client.get_order("o-1")


def test_rejects_an_answer_about_another_order(
    mocked: responses.RequestsMock, client: MicroserviceClient
) -> None:
    mocked.get(ORDER_URL, json=order_body(id="o-2"))

    with pytest.raises(ContractViolation, match="id: asked for order 'o-1', got 'o-2'"):
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

    with pytest.raises(MicroserviceServerError):
        put_processing(client)

    assert len(mocked.calls) == 1


def test_put_rejects_a_missing_idempotency_key_without_calling_the_microservice(
    client: MicroserviceClient,
) -> None:
    with pytest.raises(InvalidInput, match="idempotency_key"):
        client.set_fulfillment_status(
            "o-1", status="PROCESSING", expected_revision=3, idempotency_key=""
        )


def test_refuses_a_base_url_that_is_not_http() -> None:
    with pytest.raises(InvalidInput, match="base_url"):
        MicroserviceClient("microservice.test:8765")

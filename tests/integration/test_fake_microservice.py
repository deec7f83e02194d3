"""Integration tests: the real MicroserviceClient against a started FakeMicroservice, over HTTP."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter

from stock_sync.adapters.microservice_client import MicroserviceClient
from stock_sync.domain.errors import (
    ContractViolation,
    InvalidInput,
    MicroserviceRateLimited,
    MicroserviceServerError,
    MicroserviceTimeout,
    MicroserviceUnavailable,
    OrderNotFound,
    RevisionConflict,
)
from stock_sync.domain.revisions import Revision
from stock_sync_fake import (
    DEFAULT_STRICT,
    FakeMicroservice,
    load_orders_file,
    serve,
)
from tests import support


def an_order(order_id: str = "o-1", **changes: Any) -> dict[str, Any]:
    """Revision 1, READY_FOR_PROCESSING, fulfillment NEW, two of SKU-1; ``changes`` on top."""
    return {**support.order(order_id, ("SKU-1", 2), account_name="shop-a", revision=1), **changes}


def started_fake(strict: bool = DEFAULT_STRICT) -> Iterator[FakeMicroservice]:
    """Order o-1 at revision 1; integer revisions, as some wrappers send them: these tests
    compare revisions as numbers. The default, Allegro's string tokens, is tested under
    "revision forms" below."""
    with FakeMicroservice(orders=[an_order()], revision_form="integer", strict=strict) as started:
        yield started


def open_client(fake: FakeMicroservice, timeout_s: float) -> Iterator[MicroserviceClient]:
    with MicroserviceClient(fake.url, timeout_s=timeout_s) as microservice:
        yield microservice


@pytest.fixture
def fake() -> Iterator[FakeMicroservice]:
    yield from started_fake()


@pytest.fixture
def client(fake: FakeMicroservice) -> Iterator[MicroserviceClient]:
    yield from open_client(fake, timeout_s=2.0)


@pytest.fixture
def impatient_client(fake: FakeMicroservice) -> Iterator[MicroserviceClient]:
    yield from open_client(fake, timeout_s=0.2)


def sync(client: MicroserviceClient, *, revision: Revision, key: str = "op-1:sync") -> None:
    client.set_fulfillment_status(
        "o-1", status="PROCESSING", expected_revision=revision, idempotency_key=key
    )


def outcomes(fake: FakeMicroservice) -> list[str]:
    return [request["outcome"] for request in fake.fulfillment_requests()]


# --- the contract ---------------------------------------------------------------------------


def test_serves_an_order_the_client_parses(client: MicroserviceClient) -> None:
    order = client.get_order("o-1")

    assert (order.id, order.revision, order.status) == ("o-1", 1, "READY_FOR_PROCESSING")
    assert [(line.sku, line.quantity) for line in order.line_items] == [("SKU-1", 2)]


def test_answers_404_for_an_unknown_order(client: MicroserviceClient) -> None:
    with pytest.raises(OrderNotFound):
        client.get_order("nope")


def test_put_then_replay_with_the_same_key_has_one_effect(
    fake: FakeMicroservice, client: MicroserviceClient
) -> None:
    sync(client, revision=1)
    sync(client, revision=1)

    assert fake.order("o-1")["fulfillment_status"] == "PROCESSING"
    assert fake.order("o-1")["revision"] == 2
    assert outcomes(fake) == ["applied", "replayed"]


def test_records_what_each_put_sent(fake: FakeMicroservice, client: MicroserviceClient) -> None:
    sync(client, revision=1, key="k-1")

    [recorded] = fake.fulfillment_requests()
    assert {k: v for k, v in recorded.items() if k != "at"} == {
        "order_id": "o-1",
        "idempotency_key": "k-1",
        "status": "PROCESSING",
        "expected_revision": 1,
        "outcome": "applied",
        "http_status": 204,
        "changed": True,
        "held": False,
    }


def test_a_put_whose_sender_died_inside_its_body_never_arrived(
    fake: FakeMicroservice, client: MicroserviceClient
) -> None:
    """A sender killed between the PUT's headers and the end of its body (a worker SIGKILLed
    mid-request): no server hands an incomplete request on, so its key stays unbound and the
    retry, the whole request under the same key, takes effect (it was refused 422
    IDEMPOTENCY_KEY_REUSED when the fake bound the key to the cut-off body)."""
    body = json.dumps({"status": "PROCESSING", "expected_revision": 1}).encode()
    host, port = fake.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sender:
        sender.sendall(
            b"PUT /v1/orders/o-1/fulfillment HTTP/1.1\r\n"
            + f"Host: {host}\r\nIdempotency-Key: op-1:sync\r\n".encode()
            + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        sender.shutdown(socket.SHUT_WR)  # the sender is gone: the rest never comes
        assert sender.recv(1024) == b""  # closed without an answer: nobody to answer

    sync(client, revision=1)

    assert outcomes(fake) == ["applied"]
    assert fake.order("o-1")["fulfillment_status"] == "PROCESSING"


def test_put_with_a_stale_revision_is_a_conflict_without_effect(
    fake: FakeMicroservice, client: MicroserviceClient
) -> None:
    with pytest.raises(RevisionConflict, match="REVISION_CONFLICT"):
        sync(client, revision=7)

    assert fake.order("o-1")["fulfillment_status"] == "NEW"
    assert outcomes(fake) == ["conflict"]


def test_lenient_a_key_refused_with_a_conflict_applies_once_the_revision_matches(
    fake: FakeMicroservice, client: MicroserviceClient
) -> None:
    """The lenient mode (the fake's first, kinder behaviour): a key is remembered only once
    applied, so it may come back with another body. Strict mode refuses that (422)."""
    fake.set_strict(False)
    with pytest.raises(RevisionConflict):
        sync(client, revision=7)

    sync(client, revision=client.get_order("o-1").revision)

    assert outcomes(fake) == ["conflict", "applied"]


def test_put_without_an_idempotency_key_is_refused_with_422(fake: FakeMicroservice) -> None:
    response = requests.put(
        f"{fake.url}/v1/orders/o-1/fulfillment",
        json={"status": "PROCESSING", "expected_revision": 1},
        timeout=2,
    )

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "MISSING_IDEMPOTENCY_KEY"
    assert outcomes(fake) == ["error"]


def test_cancelled_order_reports_cancelled_with_a_new_revision(
    fake: FakeMicroservice, client: MicroserviceClient
) -> None:
    fake.cancel_order("o-1")

    order = client.get_order("o-1")

    assert (order.status, order.revision) == ("CANCELLED", 2)


# --- per-order knobs ------------------------------------------------------------------------


def test_order_shows_bought_until_ready_after_reads_gets_happened(
    fake: FakeMicroservice, client: MicroserviceClient
) -> None:
    fake.add_order(an_order("o-2"), ready_after_reads=2)

    statuses = [client.get_order("o-2").status for _ in range(3)]

    assert statuses == ["BOUGHT", "BOUGHT", "READY_FOR_PROCESSING"]


def test_not_found_reads_answer_404_before_the_order_appears(
    fake: FakeMicroservice, client: MicroserviceClient
) -> None:
    fake.add_order(an_order("o-2"), not_found_reads=2)

    for _ in range(2):
        with pytest.raises(OrderNotFound):
            client.get_order("o-2")

    assert client.get_order("o-2").id == "o-2"


def test_fail_gets_answer_a_retryable_503_then_the_order(
    fake: FakeMicroservice, client: MicroserviceClient
) -> None:
    fake.add_order(an_order("o-2"), fail_gets=1)

    with pytest.raises(MicroserviceServerError) as caught:
        client.get_order("o-2")

    assert (caught.value.status_code, caught.value.retryable) == (503, True)
    assert client.get_order("o-2").id == "o-2"


@pytest.mark.parametrize(
    ("knob", "timeout_s", "error", "match", "status_after_the_error", "outcomes_after_a_retry"),
    [
        ({"fail_puts": 1}, 2.0, MicroserviceServerError, "HTTP 503", "NEW", ["fault", "applied"]),
        (
            {"fail_puts_after_apply": 1},
            2.0,
            MicroserviceServerError,
            "HTTP 502",
            "PROCESSING",
            ["applied", "replayed"],
        ),
        (
            {"drop_puts_after_apply": 1},
            2.0,
            MicroserviceUnavailable,
            None,
            "PROCESSING",
            ["applied", "replayed"],
        ),
        (
            {"put_latency_s": 1.0},
            0.2,
            MicroserviceTimeout,
            None,
            "PROCESSING",
            ["applied", "replayed"],
        ),
    ],
    ids=[
        "fail_puts: 503 without effect",
        "fail_puts_after_apply: 502 after the effect",
        "drop_puts_after_apply: no answer after the effect",
        "put_latency_s past the timeout",
    ],
)
def test_a_put_knob_loses_one_answer_and_the_retry_with_the_key_takes_effect_once(
    fake: FakeMicroservice,
    knob: dict[str, Any],
    timeout_s: float,
    error: type[Exception],
    match: str | None,
    status_after_the_error: str,
    outcomes_after_a_retry: list[str],
) -> None:
    fake.add_order(an_order(), **knob)

    with MicroserviceClient(fake.url, timeout_s=timeout_s) as microservice:
        with pytest.raises(error, match=match):
            sync(microservice, revision=1)
        assert fake.order("o-1")["fulfillment_status"] == status_after_the_error
        sync(microservice, revision=1)

    assert outcomes(fake) == outcomes_after_a_retry
    assert fake.order("o-1")["revision"] == 2


def test_held_puts_take_effect_only_when_released_after_the_sender_gave_up(
    fake: FakeMicroservice, impatient_client: MicroserviceClient
) -> None:
    fake.add_order(an_order(), hold_puts=1)

    with pytest.raises(MicroserviceTimeout):
        sync(impatient_client, revision=1)

    assert fake.held_puts("o-1") == 1
    assert fake.order("o-1")["fulfillment_status"] == "NEW"
    impatient_client.set_fulfillment_status(
        "o-1", status="SENT", expected_revision=1, idempotency_key="not-held"
    )  # only the first PUT was held
    fake.release_puts("o-1")
    wait_until(lambda: fake.held_puts("o-1") == 0)
    assert fake.order("o-1")["fulfillment_status"] == "SENT"
    assert outcomes(fake) == ["applied", "conflict"]  # the late PUT met a newer revision


def test_late_answers_come_after_the_put_took_effect(
    fake: FakeMicroservice, impatient_client: MicroserviceClient
) -> None:
    fake.set_faults(late_answer_rate=1.0, late_answer_s=1.0)

    with pytest.raises(MicroserviceTimeout):
        sync(impatient_client, revision=1)

    assert fake.order("o-1")["fulfillment_status"] == "PROCESSING"
    assert outcomes(fake) == ["applied"]


def wait_until(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("mode", "message"),
    [("json", "not valid JSON"), ("contract", r"line_items\.0\.quantity")],
)
def test_malformed_answers_are_contract_violations(
    fake: FakeMicroservice, client: MicroserviceClient, mode: str, message: str
) -> None:
    fake.add_order(an_order(), malformed=mode)

    with pytest.raises(ContractViolation, match=message):
        client.get_order("o-1")


# --- global faults --------------------------------------------------------------------------


def test_a_closed_port_is_microservice_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    with (
        MicroserviceClient(f"http://127.0.0.1:{closed_port}", timeout_s=1.0) as microservice,
        pytest.raises(MicroserviceUnavailable),
    ):
        microservice.get_order("o-1")


def test_an_answer_slower_than_the_read_timeout_is_a_microservice_timeout(
    fake: FakeMicroservice, impatient_client: MicroserviceClient
) -> None:
    fake.set_faults(timeout_rate=1.0, timeout_s=1.0)

    with pytest.raises(MicroserviceTimeout):
        impatient_client.get_order("o-1")


def test_slow_answers_within_the_timeout_succeed(
    fake: FakeMicroservice, client: MicroserviceClient
) -> None:
    fake.set_faults(latency_s=0.05)

    assert client.get_order("o-1").id == "o-1"


def test_rate_limited_answers_carry_retry_after(
    fake: FakeMicroservice, client: MicroserviceClient
) -> None:
    fake.set_faults(rate_limit_rate=1.0, retry_after_s=3)

    with pytest.raises(MicroserviceRateLimited) as caught:
        client.get_order("o-1")

    assert caught.value.retry_after_s == 3.0


def test_rate_limited_answers_can_omit_retry_after(
    fake: FakeMicroservice, client: MicroserviceClient
) -> None:
    fake.set_faults(rate_limit_rate=1.0, retry_after_s=None)

    with pytest.raises(MicroserviceRateLimited) as caught:
        client.get_order("o-1")

    assert caught.value.retry_after_s is None


def test_faulted_puts_are_recorded_too(fake: FakeMicroservice, client: MicroserviceClient) -> None:
    fake.set_faults(error_rate=1.0)

    with pytest.raises(MicroserviceServerError):
        sync(client, revision=1)

    assert [(r["outcome"], r["http_status"]) for r in fake.fulfillment_requests()] == [
        ("fault", 503)
    ]


def test_the_same_seed_draws_the_same_faults() -> None:
    def failure_pattern() -> list[bool]:
        with (
            FakeMicroservice(orders=[an_order()], seed=7) as seeded,
            MicroserviceClient(seeded.url) as microservice,
        ):
            seeded.set_faults(error_rate=0.5)
            return [_fails(microservice) for _ in range(20)]

    first = failure_pattern()

    assert first == failure_pattern()
    assert any(first) and not all(first)


def _fails(microservice: MicroserviceClient) -> bool:
    try:
        microservice.get_order("o-1")
    except MicroserviceServerError:
        return True
    return False


def test_keeps_one_connection_alive_across_sequential_requests(
    fake: FakeMicroservice,
) -> None:
    with requests.Session() as session:
        for _ in range(50):
            assert session.get(f"{fake.url}/v1/orders/o-1", timeout=2).status_code == 200
        adapter = session.get_adapter(fake.url)
        assert isinstance(adapter, HTTPAdapter)
        pools = adapter.poolmanager.pools
        opened = [pools[key].num_connections for key in pools.keys()]  # noqa: SIM118 - the container refuses iteration

    assert opened == [1]


# --- the admin API --------------------------------------------------------------------------


def test_admin_adds_orders_with_knobs_and_shows_them(
    fake: FakeMicroservice, client: MicroserviceClient
) -> None:
    added = requests.post(
        f"{fake.url}/_admin/orders",
        json={"orders": [an_order("o-2"), {**an_order("o-3"), "not_found_reads": 1}]},
        timeout=2,
    )

    assert added.status_code == 201
    assert added.json() == {"added": ["o-2", "o-3"]}
    assert requests.get(f"{fake.url}/_admin/orders/o-2", timeout=2).json()["id"] == "o-2"
    with pytest.raises(OrderNotFound):
        client.get_order("o-3")


def test_admin_refuses_an_invalid_order_naming_the_field(fake: FakeMicroservice) -> None:
    order = an_order("o-2")
    order["line_items"][0]["quantity"] = 0

    response = requests.post(f"{fake.url}/_admin/orders", json=order, timeout=2)

    assert response.status_code == 422
    assert "line_items.0.quantity" in response.json()["error"]["message"]


def test_admin_cancels_an_order(fake: FakeMicroservice) -> None:
    response = requests.post(f"{fake.url}/_admin/orders/o-1/cancel", timeout=2)

    assert response.json()["status"] == "CANCELLED"
    assert fake.order("o-1")["status"] == "CANCELLED"


def test_admin_sets_faults(fake: FakeMicroservice, client: MicroserviceClient) -> None:
    response = requests.post(f"{fake.url}/_admin/faults", json={"error_rate": 1.0}, timeout=2)

    assert response.json()["error_rate"] == 1.0
    with pytest.raises(MicroserviceServerError):
        client.get_order("o-1")


def test_admin_lists_the_recorded_fulfillments(
    fake: FakeMicroservice, client: MicroserviceClient
) -> None:
    sync(client, revision=1)

    response = requests.get(f"{fake.url}/_admin/fulfillments", timeout=2)

    [recorded] = response.json()["fulfillments"]
    assert (recorded["idempotency_key"], recorded["outcome"]) == ("op-1:sync", "applied")


def test_admin_counts_the_contract_requests_by_method_across_a_reset(
    fake: FakeMicroservice, client: MicroserviceClient
) -> None:
    client.get_order("o-1")
    with pytest.raises(OrderNotFound):
        client.get_order("nope")  # a 404 is a request served all the same
    sync(client, revision=1)
    requests.get(f"{fake.url}/_admin/health", timeout=2)  # admin requests are not counted
    fake.reset()

    response = requests.get(f"{fake.url}/_admin/requests", timeout=2)

    assert response.json() == {"contract_requests": {"GET": 2, "PUT": 1}}
    assert fake.contract_requests() == {"GET": 2, "PUT": 1}


def test_admin_reset_forgets_everything(fake: FakeMicroservice) -> None:
    fake.set_faults(error_rate=1.0)

    requests.post(f"{fake.url}/_admin/reset", timeout=2)

    health = requests.get(f"{fake.url}/_admin/health", timeout=2).json()
    assert health == {"status": "ok", "orders": 0}
    assert fake.faults()["error_rate"] == 0.0


def test_admin_answers_404_for_an_unknown_route(fake: FakeMicroservice) -> None:
    assert requests.get(f"{fake.url}/_admin/nothing", timeout=2).status_code == 404


# --- in-process helpers and the orders file -------------------------------------------------


def test_add_order_refuses_an_unknown_knob(fake: FakeMicroservice) -> None:
    with pytest.raises(InvalidInput, match="unknown keys ready_after"):
        fake.add_order(an_order(), ready_after=1)


def test_set_faults_refuses_a_rate_above_one(fake: FakeMicroservice) -> None:
    with pytest.raises(InvalidInput, match="error_rate must be a number between 0 and 1"):
        fake.set_faults(error_rate=2)


def test_loads_an_orders_file_in_either_shape(tmp_path: Path) -> None:
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([an_order()]))
    as_object = tmp_path / "object.json"
    as_object.write_text(json.dumps({"orders": [an_order(), an_order("o-2")]}))

    assert [o["id"] for o in load_orders_file(str(as_list))] == ["o-1"]
    assert [o["id"] for o in load_orders_file(str(as_object))] == ["o-1", "o-2"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[{", "not valid JSON"),
        ('{"order": []}', "expected a JSON list of orders"),
        ('[{"id": "o-1", "line_items": [{"sku": ""}]}]', "line_items.0.sku"),
    ],
)
def test_serve_refuses_a_bad_orders_file_naming_it(
    tmp_path: Path, content: str, problem: str
) -> None:
    orders_file = tmp_path / "orders.json"
    orders_file.write_text(content)

    with pytest.raises(InvalidInput) as caught:
        serve(host="127.0.0.1", port=0, orders_file=str(orders_file), faults={})

    assert str(orders_file) in str(caught.value)
    assert problem in str(caught.value)
    assert "\n" not in str(caught.value)


def test_serve_refuses_a_missing_orders_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"

    with pytest.raises(InvalidInput, match="cannot read it"):
        serve(host="127.0.0.1", port=0, orders_file=str(missing), faults={})


# --- revision forms -------------------------------------------------------------------------


@pytest.fixture
def string_fake() -> Iterator[FakeMicroservice]:
    with FakeMicroservice(orders=[an_order()]) as started:  # the default: Allegro's strings
        yield started


@pytest.fixture
def string_client(string_fake: FakeMicroservice) -> Iterator[MicroserviceClient]:
    with MicroserviceClient(string_fake.url, timeout_s=2.0) as microservice:
        yield microservice


def test_serves_opaque_string_revisions_by_default(
    string_fake: FakeMicroservice, string_client: MicroserviceClient
) -> None:
    revision = string_client.get_order("o-1").revision

    assert string_fake.revision_form == "string"
    assert isinstance(revision, str) and len(revision) == 8
    int(revision, 16)  # hex digits
    assert string_fake.order("o-1")["revision"] == revision


def test_a_string_revision_round_trips_and_moves_on_at_each_change(
    string_fake: FakeMicroservice, string_client: MicroserviceClient
) -> None:
    first = string_client.get_order("o-1").revision
    string_client.set_fulfillment_status(
        "o-1", status="PROCESSING", expected_revision=first, idempotency_key="k-1"
    )
    second = string_client.get_order("o-1").revision
    string_fake.cancel_order("o-1")
    third = string_client.get_order("o-1").revision

    assert string_fake.order("o-1")["fulfillment_status"] == "PROCESSING"
    assert len({first, second, third}) == 3
    assert all(isinstance(revision, str) for revision in (first, second, third))
    [recorded] = string_fake.fulfillment_requests()
    assert (recorded["expected_revision"], recorded["outcome"]) == (first, "applied")


def test_a_stale_string_revision_is_a_conflict(
    string_fake: FakeMicroservice, string_client: MicroserviceClient
) -> None:
    stale = string_client.get_order("o-1").revision
    string_fake.cancel_order("o-1")

    with pytest.raises(RevisionConflict, match="REVISION_CONFLICT"):
        string_client.set_fulfillment_status(
            "o-1", status="PROCESSING", expected_revision=stale, idempotency_key="k-1"
        )

    assert string_fake.order("o-1")["fulfillment_status"] == "NEW"


def test_the_integer_form_of_a_string_revision_conflicts(
    string_fake: FakeMicroservice, string_client: MicroserviceClient
) -> None:
    string_fake.add_order(an_order(revision="1234"))  # a token that looks like a number
    assert string_client.get_order("o-1").revision == "1234"

    with pytest.raises(RevisionConflict):
        string_client.set_fulfillment_status(
            "o-1", status="PROCESSING", expected_revision=1234, idempotency_key="k-1"
        )
    string_client.set_fulfillment_status(  # another body: another key (strict binds k-1)
        "o-1", status="PROCESSING", expected_revision="1234", idempotency_key="k-2"
    )

    assert outcomes(string_fake) == ["conflict", "applied"]


def test_the_string_form_of_an_integer_revision_conflicts(
    fake: FakeMicroservice, client: MicroserviceClient
) -> None:
    assert client.get_order("o-1").revision == 1

    with pytest.raises(RevisionConflict):
        sync(client, revision="1")  # type: ignore[arg-type]  # the wrong form on purpose
    sync(client, revision=1, key="op-1:sync:1")  # another body: another key

    assert outcomes(fake) == ["conflict", "applied"]
    assert fake.order("o-1")["revision"] == 2


def test_re_adding_an_order_as_read_keeps_its_string_revision(
    string_fake: FakeMicroservice, string_client: MicroserviceClient
) -> None:
    string_fake.cancel_order("o-1")
    before = string_fake.order("o-1")

    string_fake.add_order(before)

    assert string_client.get_order("o-1").revision == before["revision"]


def test_tokens_never_come_back_after_an_order_is_added_again(
    string_fake: FakeMicroservice,
) -> None:
    seen = [string_fake.order("o-1")["revision"]]
    for _ in range(3):
        string_fake.cancel_order("o-1")
        seen.append(string_fake.order("o-1")["revision"])
        string_fake.add_order({**string_fake.order("o-1"), "status": "READY_FOR_PROCESSING"})
        string_fake.cancel_order("o-1")
        seen.append(string_fake.order("o-1")["revision"])
        string_fake.add_order(an_order())  # back to revision 1: a new token all the same
        seen.append(string_fake.order("o-1")["revision"])

    assert len(set(seen)) == len(seen)


def test_a_put_with_a_revision_of_another_type_is_refused_with_422(
    string_fake: FakeMicroservice,
) -> None:
    response = requests.put(
        f"{string_fake.url}/v1/orders/o-1/fulfillment",
        json={"status": "PROCESSING", "expected_revision": [1]},
        headers={"Idempotency-Key": "k"},
        timeout=2,
    )

    assert response.status_code == 422
    assert "expected_revision must be a string or an integer" in response.json()["error"]["message"]


def test_the_integer_form_refuses_a_string_revision_in_an_order(fake: FakeMicroservice) -> None:
    with pytest.raises(InvalidInput, match="revision must be an integer in integer revision form"):
        fake.add_order(an_order(revision="d8e8fca2"))


@pytest.mark.parametrize("revision", ["", "x" * 65, "a\nb", -1, True, 1.5])
def test_refuses_a_revision_outside_the_contract_in_an_order(
    string_fake: FakeMicroservice, revision: Any
) -> None:
    with pytest.raises(InvalidInput, match="revision must be"):
        string_fake.add_order(an_order(revision=revision))


def test_the_revision_form_is_set_through_the_admin_api(
    string_fake: FakeMicroservice, string_client: MicroserviceClient
) -> None:
    url = f"{string_fake.url}/_admin/revision_form"

    changed = requests.post(url, json={"revision_form": "integer"}, timeout=2)

    assert changed.json() == {"revision_form": "integer"}
    assert requests.get(url, timeout=2).json() == {"revision_form": "integer"}
    assert string_client.get_order("o-1").revision == 1
    refused = requests.post(url, json={"revision_form": "float"}, timeout=2)
    assert refused.status_code == 422
    string_fake.reset()
    assert string_fake.revision_form == "string"  # the constructor's form


def test_the_revision_form_is_set_in_process(fake: FakeMicroservice) -> None:
    fake.set_revision_form("string")

    assert isinstance(fake.order("o-1")["revision"], str)
    with pytest.raises(InvalidInput, match="revision_form must be one of string, integer"):
        fake.set_revision_form("hex")  # type: ignore[arg-type]  # refused on purpose


def test_serve_takes_the_revision_form(tmp_path: Path) -> None:
    orders_file = tmp_path / "orders.json"
    orders_file.write_text(json.dumps([an_order()]))
    served: list[str] = []

    def read_then_stop(url: str) -> None:
        with MicroserviceClient(url) as microservice:
            served.append(repr(microservice.get_order("o-1").revision))
        raise KeyboardInterrupt  # serve() stops on Ctrl-C

    for form in ("integer", "string"):
        serve(
            host="127.0.0.1",
            port=0,
            orders_file=str(orders_file),
            faults={},
            on_ready=read_then_stop,
            revision_form=form,  # type: ignore[arg-type]  # the loop's str is one of the two
        )

    assert served[0] == "1"
    assert served[1].startswith("'") and len(served[1]) == 10


# --- hostile answers over HTTP --------------------------------------------------------------


def test_a_trickled_body_is_cut_at_the_deadline(fake: FakeMicroservice) -> None:
    # each byte beats the read timeout tenfold; the 183-byte body takes about 37 s
    fake.add_order(an_order(), trickle_s=0.2)

    started = time.monotonic()
    with (
        MicroserviceClient(fake.url, timeout_s=2.0, deadline_s=0.5) as microservice,
        pytest.raises(
            MicroserviceTimeout, match=r"exchange not finished within its 0\.5s deadline"
        ),
    ):
        microservice.get_order("o-1")

    # ten times the deadline, for a loaded machine; read to its end, the body takes 37 s
    assert time.monotonic() - started < 5.0


def test_a_slow_but_timely_body_is_accepted(fake: FakeMicroservice) -> None:
    order = an_order()
    fake.add_order(order, trickle_s=0.001)

    with MicroserviceClient(fake.url, timeout_s=1.0, deadline_s=5.0) as microservice:
        assert microservice.get_order("o-1").id == "o-1"


def test_a_gzip_bomb_is_refused_after_reading_about_the_cap(fake: FakeMicroservice) -> None:
    fake.add_order(an_order(), gzip_bomb_bytes=50 * 1024 * 1024)
    with MicroserviceClient(fake.url, timeout_s=2.0) as microservice:
        tracemalloc.start()
        try:
            with pytest.raises(ContractViolation) as caught:
                microservice.get_order("o-1")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

    assert str(caught.value).endswith("response larger than 1048576 bytes")
    assert peak < 8 * 1024 * 1024  # reading the 50 MB would need 50 MB at least


def test_a_header_section_trickled_past_the_deadline_is_a_timeout() -> None:
    # a byte every 0.05 s beats the read timeout; the 526-byte head takes about 26 s
    with trickling_server(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 500 + b"\r\n") as url:
        started = time.monotonic()
        with (
            MicroserviceClient(url, timeout_s=1.0, deadline_s=0.5) as microservice,
            pytest.raises(MicroserviceTimeout, match=r"0\.5s deadline"),
        ):
            microservice.get_order("o-1")

    assert time.monotonic() - started < 5.0  # ten times the deadline, for a loaded machine


@contextmanager
def trickling_server(answer: bytes, interval_s: float = 0.05) -> Iterator[str]:
    """A raw TCP server that sends ``answer`` to each connection one byte per interval."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def answer_slowly() -> None:
        with contextlib.suppress(OSError):
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                for offset in range(len(answer)):
                    if stop.wait(interval_s):
                        return
                    connection.sendall(answer[offset : offset + 1])

    thread = threading.Thread(target=answer_slowly, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        thread.join(5)


def test_the_pool_stays_healthy_through_hostile_answers(fake: FakeMicroservice) -> None:
    fake.add_order(an_order("slow"), trickle_s=0.1)
    fake.add_order(an_order("bomb"), gzip_bomb_bytes=5 * 1024 * 1024)
    fake.add_order(an_order("big", line_items=[dict(LINE, id=f"li-{n}") for n in range(400)]))

    with MicroserviceClient(
        fake.url, timeout_s=1.0, deadline_s=0.3, max_response_bytes=20_000
    ) as microservice:
        for _ in range(10):
            microservice.get_order("o-1")
        assert fake.connections_accepted() == 1  # one kept-alive connection
        for hostile, error in [
            ("slow", MicroserviceTimeout),
            ("bomb", ContractViolation),
            ("big", ContractViolation),
        ]:
            with pytest.raises(error):
                microservice.get_order(hostile)
            for _ in range(10):
                assert microservice.get_order("o-1").id == "o-1"

    # an answer cut short costs its connection, never the pool: the bomb's whole (compressed)
    # body fits the first read, so its connection goes back to the pool clean
    assert fake.connections_accepted() == 3


def test_a_deadline_shuts_only_its_own_exchange_down(fake: FakeMicroservice) -> None:
    # the readers' answers take about 0.2 s each: they are in flight nearly all the time, so
    # while the slow exchanges' deadlines fire; their 3 s deadline leaves a loaded machine 15x
    fake.add_order(an_order("timely"), trickle_s=0.001)
    fake.add_order(an_order("slow"), trickle_s=0.05)  # 9 s of body: always past the deadline
    failures: list[BaseException] = []
    reads: list[str] = []
    slow_done = threading.Event()

    with MicroserviceClient(fake.url, timeout_s=2.0, deadline_s=3.0) as microservice:

        def read_until_the_slow_ones_ended() -> None:
            try:
                while not slow_done.is_set():
                    reads.append(microservice.get_order("timely").id)
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

        readers = [threading.Thread(target=read_until_the_slow_ones_ended) for _ in range(4)]
        for reader in readers:
            reader.start()
        # later than the readers' first reads: their deadlines too fall due during the reads
        wait_until(lambda: len(reads) >= 8 or bool(failures))
        with ThreadPoolExecutor(max_workers=4) as pool:
            slow = [pool.submit(microservice.get_order, "slow") for _ in range(4)]
            errors = [future.exception(timeout=60) for future in slow]
        slow_done.set()
        for reader in readers:
            reader.join(30)

    assert [type(error) for error in errors] == [MicroserviceTimeout] * 4
    assert not any(reader.is_alive() for reader in readers)
    assert failures == []
    assert len(reads) >= 4 and set(reads) == {"timely"}


LINE = {"id": "li-1", "offer_id": "off-1", "sku": "SKU-1", "quantity": 2}


@pytest.mark.parametrize("order_id", [".", "..", "a/../b", "?#%2F ż"])
def test_an_order_id_of_any_characters_round_trips(
    string_fake: FakeMicroservice, string_client: MicroserviceClient, order_id: str
) -> None:
    string_fake.add_order(an_order(order_id))

    order = string_client.get_order(order_id)
    string_client.set_fulfillment_status(
        order_id, status="SENT", expected_revision=order.revision, idempotency_key="k"
    )

    assert order.id == order_id
    assert string_fake.order(order_id)["fulfillment_status"] == "SENT"


def test_the_deadline_holds_in_a_forked_child(fake: FakeMicroservice) -> None:
    """Celery's prefork pool forks after the parent may have used a client: the deadline
    watchdog's thread does not survive a fork and must be started again in the child."""
    fake.add_order(an_order("slow"), trickle_s=0.2)  # 37 s of body, each byte within 2 s
    with MicroserviceClient(fake.url) as microservice:
        microservice.get_order("o-1")  # the watchdog thread runs in this process now
    context = multiprocessing.get_context("fork")
    outcome = context.Queue()

    child = context.Process(target=read_slow_order, args=(fake.url, outcome))
    child.start()
    child.join(60)

    assert outcome.get(timeout=1) == ("MicroserviceTimeout", True)


def read_slow_order(url: str, outcome: Any) -> None:
    started = time.monotonic()
    try:
        with MicroserviceClient(url, timeout_s=2.0, deadline_s=0.5) as microservice:
            microservice.get_order("slow")
        outcome.put(("no error", False))
    except Exception as exc:
        # cut within ten times its deadline (a loaded machine), not after the 37 s body
        outcome.put((type(exc).__name__, time.monotonic() - started < 5.0))


# --- modes: strict (Allegro's and the idempotency-key draft's) and lenient ------------------


@pytest.fixture
def strict_fake() -> Iterator[FakeMicroservice]:
    yield from started_fake(strict=True)


@pytest.fixture
def strict_client(strict_fake: FakeMicroservice) -> Iterator[MicroserviceClient]:
    yield from open_client(strict_fake, timeout_s=5.0)


@pytest.fixture
def lenient_fake() -> Iterator[FakeMicroservice]:
    yield from started_fake(strict=False)


@pytest.fixture
def background() -> Iterator[ThreadPoolExecutor]:
    """Requests sent from other threads, so a test can act while they wait in the fake."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        yield pool


def put(
    fake: FakeMicroservice,
    *,
    key: str = "k-1",
    status: str = "PROCESSING",
    revision: object = 1,
    order_id: str = "o-1",
) -> requests.Response:
    return requests.put(
        f"{fake.url}/v1/orders/{order_id}/fulfillment",
        json={"status": status, "expected_revision": revision},
        headers={"Idempotency-Key": key},
        timeout=30,
    )


def answer(response: requests.Response) -> tuple[int, str | None, bool | None]:
    """Status code, error code and retryable flag (None, None for a 204)."""
    if response.status_code == 204:
        return 204, None, None
    error = response.json()["error"]
    return response.status_code, error["code"], error["retryable"]


def state_of(fake: FakeMicroservice, order_id: str = "o-1") -> tuple[str, str, Any]:
    order = fake.order(order_id)
    return order["status"], order["fulfillment_status"], order["revision"]


def test_modes_default_to_the_module_constant_everywhere(tmp_path: Path) -> None:
    orders_file = tmp_path / "orders.json"
    orders_file.write_text(json.dumps([an_order()]))
    served: list[bool] = []

    def ask_mode_then_stop(url: str) -> None:
        served.append(requests.get(f"{url}/_admin/mode", timeout=5).json()["strict"])
        raise KeyboardInterrupt  # serve() stops on Ctrl-C

    serve(
        host="127.0.0.1",
        port=0,
        orders_file=str(orders_file),
        faults={},
        on_ready=ask_mode_then_stop,
    )

    assert DEFAULT_STRICT is True  # the tests and the fault suite run on the strict behaviour
    assert FakeMicroservice().strict is DEFAULT_STRICT
    assert served == [DEFAULT_STRICT]


def test_strict_a_put_that_keeps_the_status_answers_204_and_moves_no_revision(
    strict_fake: FakeMicroservice,
) -> None:
    kept = put(strict_fake, key="k-1", status="NEW", revision=1)
    moved = put(strict_fake, key="k-2", status="PROCESSING", revision=1)

    assert (kept.status_code, moved.status_code) == (204, 204)
    assert state_of(strict_fake) == ("READY_FOR_PROCESSING", "PROCESSING", 2)
    recorded = [(r["outcome"], r["changed"]) for r in strict_fake.fulfillment_requests()]
    assert recorded == [("applied", False), ("applied", True)]
    assert answer(put(strict_fake, key="k-1", status="NEW", revision=1)) == (204, None, None)
    assert outcomes(strict_fake)[-1] == "replayed"  # the unchanged PUT's key counts as applied


def test_lenient_a_put_that_keeps_the_status_still_moves_the_revision(
    lenient_fake: FakeMicroservice,
) -> None:
    assert put(lenient_fake, key="k-1", status="NEW", revision=1).status_code == 204

    assert state_of(lenient_fake) == ("READY_FOR_PROCESSING", "NEW", 2)
    [recorded] = lenient_fake.fulfillment_requests()
    assert (recorded["outcome"], recorded["changed"]) == ("applied", False)


def test_strict_a_key_applied_then_sent_with_another_body_is_refused_422(
    strict_fake: FakeMicroservice,
) -> None:
    strict_fake.add_order(an_order("o-2"))
    assert put(strict_fake, key="k-1", status="PROCESSING", revision=1).status_code == 204

    other_status = put(strict_fake, key="k-1", status="SENT", revision=2)
    other_order = put(strict_fake, key="k-1", status="PROCESSING", revision=1, order_id="o-2")

    assert answer(other_status) == (422, "IDEMPOTENCY_KEY_REUSED", False)
    assert answer(other_order) == (422, "IDEMPOTENCY_KEY_REUSED", False)
    assert state_of(strict_fake) == ("READY_FOR_PROCESSING", "PROCESSING", 2)
    assert state_of(strict_fake, "o-2") == ("READY_FOR_PROCESSING", "NEW", 1)
    assert outcomes(strict_fake) == ["applied", "key_reused", "key_reused"]


def test_lenient_a_key_applied_then_sent_with_another_body_is_replayed_without_effect(
    lenient_fake: FakeMicroservice,
) -> None:
    assert put(lenient_fake, key="k-1", status="PROCESSING", revision=1).status_code == 204

    assert put(lenient_fake, key="k-1", status="SENT", revision=2).status_code == 204

    assert state_of(lenient_fake) == ("READY_FOR_PROCESSING", "PROCESSING", 2)
    assert outcomes(lenient_fake) == ["applied", "replayed"]


def test_strict_a_key_refused_with_a_conflict_is_bound_to_that_body(
    strict_fake: FakeMicroservice,
) -> None:
    conflict = put(strict_fake, key="k-1", revision=7)

    reloaded = put(strict_fake, key="k-1", revision=1)  # the right revision, the same key

    assert answer(conflict) == (409, "REVISION_CONFLICT", True)
    assert answer(reloaded) == (422, "IDEMPOTENCY_KEY_REUSED", False)
    assert state_of(strict_fake) == ("READY_FOR_PROCESSING", "NEW", 1)
    assert outcomes(strict_fake) == ["conflict", "key_reused"]


def test_lenient_a_key_refused_with_a_conflict_may_be_sent_with_another_body(
    lenient_fake: FakeMicroservice,
) -> None:
    assert put(lenient_fake, key="k-1", revision=7).status_code == 409

    assert put(lenient_fake, key="k-1", revision=1).status_code == 204

    assert outcomes(lenient_fake) == ["conflict", "applied"]


def test_strict_a_request_refused_with_a_conflict_applies_when_retried_unchanged(
    strict_fake: FakeMicroservice,
) -> None:
    assert answer(put(strict_fake, key="k-1", revision=2)) == (409, "REVISION_CONFLICT", True)
    strict_fake.buyer_edit("o-1")  # the order reaches the revision the request expected

    assert put(strict_fake, key="k-1", revision=2).status_code == 204

    assert state_of(strict_fake) == ("READY_FOR_PROCESSING", "PROCESSING", 3)
    assert outcomes(strict_fake) == ["conflict", "applied"]


@pytest.mark.parametrize(
    ("knobs", "faults"), [({"fail_puts": 1}, {}), ({}, {"error_rate": 1.0})], ids=["knob", "rate"]
)
def test_strict_a_key_answered_503_is_bound_yet_may_be_retried_unchanged(
    strict_fake: FakeMicroservice, knobs: dict[str, Any], faults: dict[str, Any]
) -> None:
    strict_fake.add_order(an_order(), **knobs)
    strict_fake.set_faults(**faults)
    assert answer(put(strict_fake, key="k-1")) == (503, "SERVICE_UNAVAILABLE", True)
    strict_fake.set_faults(error_rate=0.0)

    other = put(strict_fake, key="k-1", status="SENT")
    same = put(strict_fake, key="k-1")

    assert answer(other) == (422, "IDEMPOTENCY_KEY_REUSED", False)
    assert same.status_code == 204
    assert outcomes(strict_fake) == ["fault", "key_reused", "applied"]


def test_strict_a_key_is_in_flight_while_its_put_waits_at_the_hold_puts_gate(
    strict_fake: FakeMicroservice, background: ThreadPoolExecutor
) -> None:
    strict_fake.add_order(an_order(), hold_puts=1)
    first = background.submit(put, strict_fake, key="k-1")
    wait_until(lambda: strict_fake.held_puts("o-1") == 1)

    same = put(strict_fake, key="k-1")
    other = put(strict_fake, key="k-1", status="SENT")
    strict_fake.release_puts("o-1")

    assert answer(same) == (409, "IDEMPOTENCY_KEY_IN_FLIGHT", True)
    assert answer(other) == (422, "IDEMPOTENCY_KEY_REUSED", False)
    assert first.result(timeout=30).status_code == 204
    assert put(strict_fake, key="k-1").status_code == 204
    assert state_of(strict_fake) == ("READY_FOR_PROCESSING", "PROCESSING", 2)  # one effect
    assert outcomes(strict_fake) == ["in_flight", "key_reused", "applied", "replayed"]
    assert [r["held"] for r in strict_fake.fulfillment_requests()] == [False, False, True, False]


def test_strict_a_key_is_in_flight_while_its_put_is_held_for_hold_puts_s(
    strict_fake: FakeMicroservice, background: ThreadPoolExecutor
) -> None:
    strict_fake.add_order(an_order(), hold_puts_s=2.0)  # the replay is sent within it
    first = background.submit(put, strict_fake, key="k-1")
    wait_until(lambda: strict_fake.puts_in_flight("o-1") == 1)

    same = put(strict_fake, key="k-1")

    assert answer(same) == (409, "IDEMPOTENCY_KEY_IN_FLIGHT", True)
    assert strict_fake.order("o-1")["fulfillment_status"] == "NEW"  # not applied yet
    assert first.result(timeout=30).status_code == 204
    assert strict_fake.puts_in_flight("o-1") == 0
    assert put(strict_fake, key="k-1").status_code == 204  # answered on arrival: no hold
    assert strict_fake.order("o-1")["revision"] == 2
    assert outcomes(strict_fake) == ["in_flight", "applied", "replayed"]


def test_strict_a_key_is_in_flight_while_its_put_sleeps_on_a_global_timeout(
    strict_fake: FakeMicroservice, background: ThreadPoolExecutor
) -> None:
    strict_fake.set_faults(timeout_rate=1.0, timeout_s=2.0)
    first = background.submit(put, strict_fake, key="k-1")
    wait_until(lambda: strict_fake.puts_in_flight("o-1") == 1)
    strict_fake.set_faults(timeout_rate=0.0)

    assert answer(put(strict_fake, key="k-1")) == (409, "IDEMPOTENCY_KEY_IN_FLIGHT", True)
    assert first.result(timeout=30).status_code == 204
    assert outcomes(strict_fake) == ["in_flight", "applied"]


def test_strict_a_put_refused_after_waiting_lets_the_in_flight_retry_apply(
    strict_fake: FakeMicroservice, background: ThreadPoolExecutor
) -> None:
    strict_fake.add_order(an_order(), hold_puts=1, fail_puts=1)
    first = background.submit(put, strict_fake, key="k-1")
    wait_until(lambda: strict_fake.held_puts("o-1") == 1)
    assert put(strict_fake, key="k-1").status_code == 409  # in flight
    strict_fake.release_puts("o-1")
    assert first.result(timeout=30).status_code == 503  # refused after the gate

    retried = put(strict_fake, key="k-1")

    assert retried.status_code == 204
    assert outcomes(strict_fake) == ["in_flight", "fault", "applied"]


def test_lenient_two_puts_with_one_key_may_wait_together_and_apply_once(
    lenient_fake: FakeMicroservice, background: ThreadPoolExecutor
) -> None:
    lenient_fake.add_order(an_order(), hold_puts=2)
    sent = [background.submit(put, lenient_fake, key="k-1") for _ in range(2)]
    wait_until(lambda: lenient_fake.held_puts("o-1") == 2)

    lenient_fake.release_puts("o-1")

    assert [future.result(timeout=30).status_code for future in sent] == [204, 204]
    assert sorted(outcomes(lenient_fake)) == ["applied", "replayed"]
    assert lenient_fake.order("o-1")["revision"] == 2


@pytest.mark.parametrize(
    ("knob", "error"),
    [
        ("fail_puts_after_apply", MicroserviceServerError),
        ("drop_puts_after_apply", MicroserviceUnavailable),
    ],
)
def test_strict_answers_lost_after_apply_are_replayed_without_a_second_effect(
    strict_fake: FakeMicroservice,
    strict_client: MicroserviceClient,
    knob: str,
    error: type[Exception],
) -> None:
    strict_fake.add_order(an_order(), **{knob: 1})

    with pytest.raises(error):
        sync(strict_client, revision=1, key="k-1")
    assert put(strict_fake, key="k-1").status_code == 204

    assert state_of(strict_fake) == ("READY_FOR_PROCESSING", "PROCESSING", 2)
    assert outcomes(strict_fake) == ["applied", "replayed"]


def test_strict_the_buyer_edits_right_after_the_chosen_read(
    strict_fake: FakeMicroservice, strict_client: MicroserviceClient
) -> None:
    strict_fake.add_order(an_order(), edit_after_reads=2)

    read = [strict_client.get_order("o-1").revision for _ in range(3)]

    assert read == [1, 1, 2]  # the second read answered what it saw, then the buyer edited
    assert state_of(strict_fake) == ("READY_FOR_PROCESSING", "NEW", 2)
    assert [(e["order_id"], e["kind"], e["revision"]) for e in strict_fake.buyer_events()] == [
        ("o-1", "edit", 2)
    ]
    with pytest.raises(RevisionConflict):  # a sync with the revision of the load
        sync(strict_client, revision=1, key="k-1")


def test_strict_the_buyer_cancels_right_after_the_chosen_read(
    strict_fake: FakeMicroservice, strict_client: MicroserviceClient
) -> None:
    strict_fake.add_order(an_order(), cancel_after_reads=1)

    loaded = strict_client.get_order("o-1")

    assert (loaded.status, loaded.revision) == ("READY_FOR_PROCESSING", 1)
    assert state_of(strict_fake) == ("CANCELLED", "NEW", 2)
    assert [(e["kind"], e["revision"]) for e in strict_fake.buyer_events()] == [("cancel", 2)]
    assert strict_client.get_order("o-1").status == "CANCELLED"
    assert len(strict_fake.buyer_events()) == 1  # once


def test_a_held_get_answers_an_older_state_after_a_newer_read(
    strict_fake: FakeMicroservice, strict_client: MicroserviceClient, background: ThreadPoolExecutor
) -> None:
    strict_fake.add_order(an_order(), hold_get_answers=1)
    older = background.submit(strict_client.get_order, "o-1")
    wait_until(lambda: strict_fake.held_get_answers("o-1") == 1)
    sync(strict_client, revision=1, key="k-1")

    newer = strict_client.get_order("o-1")  # only the first GET was held
    assert strict_fake.held_get_answers("o-1") == 1  # the older one is still waiting
    strict_fake.release_get_answers("o-1")

    assert (newer.revision, newer.fulfillment_status) == (2, "PROCESSING")
    assert (older.result(timeout=30).revision, older.result().fulfillment_status) == (1, "NEW")
    assert strict_fake.held_get_answers("o-1") == 0


@pytest.mark.parametrize("strict", [True, False])
def test_set_fulfillment_status_changes_the_order_behind_the_products_back(strict: bool) -> None:
    with FakeMicroservice(orders=[an_order()], revision_form="integer", strict=strict) as fake:
        fake.set_fulfillment_status("o-1", "SENT")
        fake.set_fulfillment_status("o-1", "SENT")  # no change: no new revision

        assert state_of(fake) == ("READY_FOR_PROCESSING", "SENT", 2)
        assert fake.buyer_events() == []
        with pytest.raises(InvalidInput, match=r"status must be one of .*, got 'LOST'"):
            fake.set_fulfillment_status("o-1", "LOST")
        with pytest.raises(InvalidInput, match="no order 'nope'"):
            fake.set_fulfillment_status("nope", "SENT")


def test_the_buyer_edit_rate_is_drawn_from_the_seed() -> None:
    def revisions_read(seed: int) -> list[int]:
        with FakeMicroservice(orders=[an_order()], seed=seed, revision_form="integer") as fake:
            fake.set_faults(buyer_edit_rate=0.5)
            read = [
                requests.get(f"{fake.url}/v1/orders/o-1", timeout=5).json()["revision"]
                for _ in range(20)
            ]
            status, fulfillment, revision = state_of(fake)
            assert [e["revision"] for e in fake.buyer_events()] == list(range(2, revision + 1))
            assert (status, fulfillment) == (
                "READY_FOR_PROCESSING",
                "NEW",
            )  # edits change nothing else
            return read

    first = revisions_read(7)

    assert first == revisions_read(7)
    assert 1 < first[-1] < 20  # some reads were followed by an edit, some not


def test_the_buyer_edit_rate_touches_only_orders_ready_for_processing(
    strict_fake: FakeMicroservice, strict_client: MicroserviceClient
) -> None:
    strict_fake.add_order(an_order(status="BOUGHT"))
    strict_fake.set_faults(buyer_edit_rate=1.0)

    assert strict_client.get_order("o-1").revision == 1
    assert strict_fake.buyer_events() == []


def test_the_buyer_cancel_rate_is_drawn_from_the_seed() -> None:
    ids = [f"o-{n}" for n in range(20)]

    def cancelled(seed: int) -> list[str]:
        orders = [an_order(order_id) for order_id in ids]
        with FakeMicroservice(orders=orders, seed=seed, revision_form="integer") as fake:
            fake.set_faults(buyer_cancel_rate=0.5)
            for order_id in ids:
                requests.get(f"{fake.url}/v1/orders/{order_id}", timeout=5).raise_for_status()
            events = fake.buyer_events()
            assert all(state_of(fake, e["order_id"]) == ("CANCELLED", "NEW", 2) for e in events)
            return [e["order_id"] for e in events if e["kind"] == "cancel"]

    first = cancelled(7)

    assert first == cancelled(7)
    assert 0 < len(first) < len(ids)


@pytest.mark.parametrize(
    "changes", [{"fulfillment_status": "PROCESSING"}, {"status": "BOUGHT"}], ids=str
)
def test_the_buyer_cancel_rate_touches_only_new_orders_ready_for_processing(
    strict_fake: FakeMicroservice, strict_client: MicroserviceClient, changes: dict[str, str]
) -> None:
    strict_fake.add_order(an_order(**changes))
    strict_fake.set_faults(buyer_cancel_rate=1.0)

    strict_client.get_order("o-1")

    assert strict_fake.order("o-1")["revision"] == 1
    assert strict_fake.buyer_events() == []


def test_the_hold_rate_is_drawn_from_the_seed() -> None:
    def held(seed: int) -> list[bool]:
        with FakeMicroservice(orders=[an_order()], seed=seed, strict=True) as fake:
            fake.set_faults(hold_rate=0.5, hold_s=0.01)
            revision = fake.order("o-1")["revision"]
            for n in range(12):
                assert put(fake, key=f"k-{n}", status="NEW", revision=revision).status_code == 204
            return [r["held"] for r in fake.fulfillment_requests()]

    first = held(7)

    assert first == held(7)
    assert any(first) and not all(first)


def test_a_put_held_by_the_hold_rate_is_in_flight_until_it_applies(
    strict_fake: FakeMicroservice, background: ThreadPoolExecutor
) -> None:
    strict_fake.set_faults(hold_rate=1.0, hold_s=2.0)
    first = background.submit(put, strict_fake, key="k-1")
    wait_until(lambda: strict_fake.puts_in_flight("o-1") == 1)

    assert put(strict_fake, key="k-1").status_code == 409
    assert first.result(timeout=30).status_code == 204
    assert [(r["outcome"], r["held"]) for r in strict_fake.fulfillment_requests()] == [
        ("in_flight", False),
        ("applied", True),
    ]


def test_admin_routes_for_the_mode_the_buyer_and_the_holds(
    strict_fake: FakeMicroservice, background: ThreadPoolExecutor
) -> None:
    admin = f"{strict_fake.url}/_admin"
    assert requests.get(f"{admin}/mode", timeout=5).json() == {"strict": True}
    assert requests.post(f"{admin}/mode", json={"strict": False}, timeout=5).json() == {
        "strict": False
    }
    assert strict_fake.strict is False
    strict_fake.set_strict(True)

    edited = requests.post(f"{admin}/orders/o-1/edit", timeout=5).json()
    changed = requests.post(
        f"{admin}/orders/o-1/fulfillment", json={"status": "SENT"}, timeout=5
    ).json()
    events = requests.get(f"{admin}/buyer_events", timeout=5).json()["buyer_events"]

    assert (edited["revision"], changed["revision"], changed["fulfillment_status"]) == (
        2,
        3,
        "SENT",
    )
    assert [(e["kind"], e["revision"]) for e in events] == [("edit", 2)]
    strict_fake.add_order(an_order(), hold_get_answers=1)
    held = background.submit(requests.get, f"{strict_fake.url}/v1/orders/o-1", timeout=30)
    wait_until(lambda: strict_fake.held_get_answers("o-1") == 1)
    holds = requests.get(f"{admin}/orders/o-1/holds", timeout=5).json()
    assert holds == {"held_puts": 0, "puts_in_flight": 0, "held_get_answers": 1}
    assert requests.post(f"{admin}/orders/o-1/release_gets", timeout=5).status_code == 200
    assert held.result(timeout=30).status_code == 200
    assert requests.post(f"{admin}/orders/nope/edit", timeout=5).status_code == 404
    assert requests.get(f"{admin}/orders/nope/holds", timeout=5).status_code == 404


@pytest.mark.parametrize(
    ("route", "payload", "named"),
    [
        ("mode", {"strict": "yes"}, "strict must be true or false, got 'yes'"),
        ("mode", {"strict": True, "lenient": False}, "unknown keys lenient"),
        ("orders/o-1/fulfillment", {"status": "LOST"}, "status must be one of"),
        ("orders/o-1/fulfillment", {}, "missing status"),
        ("orders", {**an_order("o-2"), "hold_puts_s": -1}, "o-2: hold_puts_s must be a number"),
        ("orders", {**an_order("o-2"), "edit_after_reads": 1.5}, "edit_after_reads must be"),
        ("orders", {**an_order("o-2"), "cancel_after_reads": -1}, "cancel_after_reads must be"),
        ("orders", {**an_order("o-2"), "hold_get_answers": "2"}, "hold_get_answers must be"),
        ("faults", {"hold_rate": 2}, "hold_rate must be a number between 0 and 1"),
        ("faults", {"hold_s": -1}, "hold_s must be a number of seconds"),
        ("faults", {"buyer_edit_rate": True}, "buyer_edit_rate must be a number between"),
        ("faults", {"buyer_cancel_rate": -0.1}, "buyer_cancel_rate must be a number between"),
    ],
)
def test_admin_refuses_bad_values_naming_them_in_one_line(
    strict_fake: FakeMicroservice, route: str, payload: dict[str, Any], named: str
) -> None:
    response = requests.post(f"{strict_fake.url}/_admin/{route}", json=payload, timeout=5)

    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert named in message and "\n" not in message
    assert strict_fake.strict is True
    assert state_of(strict_fake) == ("READY_FOR_PROCESSING", "NEW", 1)


@pytest.mark.parametrize(
    ("knobs", "named"),
    [
        ({"hold_puts_s": -1}, "hold_puts_s must be a number of seconds >= 0"),
        ({"edit_after_reads": -1}, "edit_after_reads must be an integer >= 0"),
        ({"cancel_after_reads": True}, "cancel_after_reads must be an integer >= 0"),
        ({"hold_get_answers": 0.5}, "hold_get_answers must be an integer >= 0"),
    ],
)
def test_add_order_refuses_bad_new_knobs_naming_them(
    strict_fake: FakeMicroservice, knobs: dict[str, Any], named: str
) -> None:
    with pytest.raises(InvalidInput, match=named):
        strict_fake.add_order(an_order(), **knobs)


def test_the_mode_refuses_anything_but_a_boolean() -> None:
    with pytest.raises(InvalidInput, match="strict must be true or false, got 1"):
        FakeMicroservice(strict=1)  # type: ignore[arg-type]  # refused on purpose
    with FakeMicroservice() as fake, pytest.raises(InvalidInput, match="got 'yes'"):
        fake.set_strict("yes")  # type: ignore[arg-type]  # refused on purpose


def test_reset_restores_the_constructors_mode_and_forgets_keys_and_events(
    strict_fake: FakeMicroservice,
) -> None:
    assert put(strict_fake, key="k-1").status_code == 204
    strict_fake.buyer_edit("o-1")
    strict_fake.set_strict(False)

    strict_fake.reset()

    assert strict_fake.strict is True
    assert strict_fake.buyer_events() == []
    strict_fake.add_order(an_order())
    assert put(strict_fake, key="k-1", status="SENT").status_code == 204  # a new key again


@pytest.mark.parametrize(("flag", "strict"), [("--strict", True), ("--lenient", False)])
def test_the_command_takes_the_mode(flag: str, strict: bool) -> None:
    url, process = start_command("fake-microservice", "--port", "0", flag)
    try:
        mode = requests.get(f"{url}/_admin/mode", timeout=5).json()
    finally:
        process.send_signal(signal.SIGINT)  # how an operator stops it
        stop_or_show(process)

    assert mode == {"strict": strict}
    assert process.returncode == 0


def stop_or_show(process: subprocess.Popen[str], timeout_s: float = 30) -> None:
    """Wait for ``process`` to end; if it does not, kill it and fail with what it printed."""
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        _, printed = process.communicate()
        pytest.fail(f"still running {timeout_s:g} s after SIGINT; its stderr: {printed[-2000:]!r}")


def start_command(*arguments: str) -> tuple[str, subprocess.Popen[str]]:
    """``stock-sync ARGUMENTS`` started as an operator starts it, in an environment of its own
    (nothing a test left in this process's: the pipeline's settings, tracing, Sentry, which
    the fake's command does not read); the URL it announces on stderr."""
    own = ("STOCK_SYNC_", "OTEL_", "SENTRY_")
    environment = {name: value for name, value in os.environ.items() if not name.startswith(own)}
    # A shell starts it with SIGINT neither blocked nor ignored; a child inherits both from
    # the thread that starts it, and a test process that ran workers may have changed them.
    as_from_a_shell = (
        "import signal; signal.pthread_sigmask(signal.SIG_SETMASK, []); "
        "signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from stock_sync.entrypoints.cli import main; main()"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", as_from_a_shell, *arguments],
        env=environment,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    announced = process.stderr.readline()  # blocks until it listens (or exits)
    match = re.search(r"listening on (http://\S+)", announced)
    if match is None:
        process.kill()
        process.wait(30)
        pytest.fail(f"the command did not announce its URL: {announced!r}")
    return match.group(1), process

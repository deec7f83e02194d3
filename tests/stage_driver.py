"""Running the pipeline's stages one by one in the test thread, in the order a fault would put
them in, against real PostgreSQL and the fake microservice over HTTP (no broker: the services'
dispatcher only records)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from stock_sync.adapters.db import Database
from stock_sync.adapters.microservice_client import MicroserviceClient
from stock_sync.adapters.settings import load_settings
from stock_sync.adapters.stock_ledger import get_stock, set_stock
from stock_sync.composition import Services, build_services
from stock_sync.domain import stages
from stock_sync.domain.stages import StageOutcome
from stock_sync.producer import submit_operation
from stock_sync_fake import FakeMicroservice
from tests.support import RecordingDispatcher

CLIENT_TIMEOUT_S = 0.5


def make_services(
    database: Database,
    fake: FakeMicroservice,
    client_class: type[MicroserviceClient] = MicroserviceClient,
    timeout_s: float = CLIENT_TIMEOUT_S,
    url: str | None = None,
) -> Services:
    """Services on ``database`` whose client talks to ``fake`` (or to ``url``, a proxy in
    front of it)."""
    return build_services(
        load_settings(),
        database=database,
        dispatcher=RecordingDispatcher(),
        client=client_class(url or fake.url, timeout_s=timeout_s),
    )


@pytest.fixture(name="services")
def services_fixture(
    clean_database: Database, fake_microservice: FakeMicroservice
) -> Iterator[Services]:
    """The fixture ``services``: services on the clean database whose client talks to the
    fake microservice, reset. A test module has it by importing ``services_fixture``."""
    fake_microservice.reset()
    built = make_services(clean_database, fake_microservice)
    yield built
    built.client.close()


def run(services: Services, stage: stages.Stage, operation_id: uuid.UUID) -> StageOutcome:
    """Run ``stage`` once; it must not have scheduled a retry."""
    result = services.synchronization.execute(stage, operation_id)
    assert result.retry_in_s is None, f"{stage.name} scheduled a retry"
    return result.outcome


def deducted_operation(
    services: Services, fake: FakeMicroservice, order_id: str, *, stock: int = 5
) -> uuid.UUID:
    """An operation in STOCK_DEDUCTED (its order's SKU-F taken), its sync not yet run."""
    with services.database.transaction() as session:
        set_stock(session, "SKU-F", stock)
    operation_id = submit_operation(order_id, services=services)
    for stage in (stages.LOAD_LINE_ITEMS, stages.VALIDATE_STOCK, stages.DEDUCT_STOCK):
        assert run(services, stage, operation_id) is StageOutcome.DONE
    return operation_id


def the_rollback(services: Services) -> uuid.UUID:
    """The one microservice rollback the services enqueued."""
    (rollback_id,) = services.dispatcher.rollbacks  # type: ignore[attr-defined]
    return rollback_id


def fulfillment(fake: FakeMicroservice, order_id: str) -> str:
    return str(fake.order(order_id)["fulfillment_status"])


def effective_puts(fake: FakeMicroservice, order_id: str, status: str) -> int:
    return sum(
        1
        for put in fake.fulfillment_requests()
        if put["order_id"] == order_id and put["outcome"] == "applied" and put["status"] == status
    )


def outcomes(fake: FakeMicroservice, order_id: str) -> list[str]:
    return [p["outcome"] for p in fake.fulfillment_requests() if p["order_id"] == order_id]


def wait_for_outcome(fake: FakeMicroservice, order_id: str, outcome: str) -> None:
    """Until the fake recorded a PUT of ``order_id`` with ``outcome`` (bounded)."""
    for _ in range(1000):
        if outcome in outcomes(fake, order_id):
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"no {outcome} PUT of {order_id}: {outcomes(fake, order_id)}")


def stock(services: Services, sku: str) -> int | None:
    with services.database.transaction() as session:
        return get_stock(session, sku)


class HoldingProxy:
    """An HTTP proxy in front of the fake that holds the first PUT it forwards until
    :meth:`release`: a request a proxy kept, applied long after its sender gave up (DESIGN.md,
    "What the contract does not promise"). Everything else passes at once."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.held = threading.Event()  # set once the first PUT is being held
        self.forwarded = threading.Event()  # set once it has been forwarded, late
        self._release = threading.Event()
        self._holding_taken = False
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> HoldingProxy:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def release(self) -> None:
        self._release.set()
        assert self.forwarded.wait(30), "the held PUT was never forwarded"

    def _should_hold(self) -> bool:
        with self._lock:
            first, self._holding_taken = not self._holding_taken, True
            return first

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._forward()

            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy._should_hold():
                    proxy.held.set()
                    proxy._release.wait(60)
                    proxy._send_upstream("PUT", self.path, self.headers, body)
                    proxy.forwarded.set()
                    return  # its sender gave up long ago: nobody reads this answer
                self._forward(body)

            def _forward(self, body: bytes | None = None) -> None:
                answer = proxy._send_upstream(self.command, self.path, self.headers, body)
                self.send_response(answer.status_code)
                for name in ("Content-Type", "Retry-After"):
                    if name in answer.headers:
                        self.send_header(name, answer.headers[name])
                self.send_header("Content-Length", str(len(answer.content)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(answer.content)

        return Handler

    def _send_upstream(
        self, method: str, path: str, headers: object, body: bytes | None
    ) -> requests.Response:
        forwarded = {
            name: value
            for name, value in headers.items()  # type: ignore[attr-defined]
            if name.lower() in ("content-type", "idempotency-key")
        }
        return requests.request(
            method, self.upstream + path, headers=forwarded, data=body, timeout=30
        )

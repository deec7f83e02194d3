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

import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Self

from stock_sync.domain.errors import InvalidInput
from stock_sync_fake.http_server import FakeHTTPServer, FakeHTTPServerV6
from stock_sync_fake.orders import RevisionForm, checked_revision_form, load_orders_file
from stock_sync_fake.state import DEFAULT_STRICT, FakeState


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
        self._state = FakeState(seed, checked_revision_form(revision_form), strict=strict)
        self._state.add_orders(list(orders), {})
        self._server: FakeHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Bind and serve; returns self so ``with FakeMicroservice().start() as fake`` works."""
        if self._server is not None:
            raise RuntimeError("FakeMicroservice is already running")
        server_class = FakeHTTPServerV6 if ":" in self._host else FakeHTTPServer
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

    def __exit__(self, *exc_info: object) -> None:
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

"""The fake's state: orders, fault knobs, recorded PUTs and Idempotency-Keys behind one lock,
and what a contract request does to them (the reads, the PUT from arrival to answer, the buyer's
changes, the gates that hold requests). Never sleeps while holding the lock.
"""

from __future__ import annotations

import copy
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from stock_sync.adapters.marketplace_contract import (
    FULFILLMENT_STATUSES,
    IDEMPOTENCY_KEY_IN_FLIGHT,
    IDEMPOTENCY_KEY_REUSED,
    REVISION_CONFLICT,
)
from stock_sync.domain.errors import InvalidInput
from stock_sync.domain.revisions import same_revision
from stock_sync_fake.orders import (
    Faults,
    OrderKnobs,
    PutBody,
    RevisionForm,
    StoredOrder,
    checked_order,
    checked_revision_form,
    flag,
    one_of,
    parse_put_body,
    updated_faults,
)
from stock_sync_fake.replies import (
    Reply,
    error_reply,
    gzipped_zeros,
    not_found,
    order_reply,
    rate_limited,
    unavailable,
)

# Allegro and the IETF idempotency-key draft (see the module docstring of server); lenient is the
# kinder behaviour the fake had first. Every entry point (constructor, serve, the command)
# follows this.
DEFAULT_STRICT = True
_NOT_PAID = ("BOUGHT", "FILLED_IN")
_MAX_HOLD_S = 300.0


@dataclass(frozen=True)
class FaultDraw:
    delay_s: float
    reply: Reply | None = None


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

    reply: Reply
    outcome: str


class FakeState:
    """Orders, faults, recorded PUTs and Idempotency-Keys behind one lock; never sleeps while
    holding it."""

    def __init__(
        self, seed: int, revision_form: RevisionForm, *, strict: bool = DEFAULT_STRICT
    ) -> None:
        self._lock = threading.Lock()
        self._seed = seed
        self._initial_revision_form = revision_form
        self._revision_form = revision_form
        self._initial_strict = flag(strict, "strict")
        self._strict = self._initial_strict
        self._orders: dict[str, StoredOrder] = {}
        self._generations: dict[str, int] = {}
        self._faults = Faults()
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
            self._faults = Faults()
            self._applied_keys.clear()
            self._keys.clear()
            self._fulfillments.clear()
            self._buyer_events.clear()
            self._random = random.Random(self._seed)
            gates = [*self._gates.values(), *self._get_gates.values()]
            self._gates.clear()  # the dicts stay: _release is handed them before it locks
            self._get_gates.clear()
        for gate in gates:
            gate.set()

    def add_orders(self, raw_orders: Iterable[object], overrides: Mapping[str, Any]) -> list[str]:
        parsed = [checked_order(raw, overrides) for raw in raw_orders]  # all or nothing
        for _, knobs in parsed:
            if knobs.gzip_bomb_bytes:  # built now, not under the lock of a GET
                gzipped_zeros(knobs.gzip_bomb_bytes)
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

    def _stored(self, body: dict[str, Any], knobs: OrderKnobs) -> StoredOrder:
        order_id, revision = body["id"], body.pop("revision")
        generation = self._generations.get(order_id, 0)
        self._generations[order_id] = generation + 1
        if isinstance(revision, str):  # served as given until the first change
            return StoredOrder(body, knobs, counter=0, token=revision, generation=generation)
        return StoredOrder(body, knobs, counter=revision, token=None, generation=generation)

    def revision_form(self) -> RevisionForm:
        with self._lock:
            return self._revision_form

    def set_revision_form(self, form: object) -> RevisionForm:
        checked = checked_revision_form(form)
        with self._lock:
            self._revision_form = checked
            return checked

    def strict(self) -> bool:
        with self._lock:
            return self._strict

    def set_strict(self, strict: object) -> bool:
        checked = flag(strict, "strict")
        with self._lock:
            self._strict = checked
            return checked

    def set_faults(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._faults = updated_faults(self._faults, changes)
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
        return self._changed(order_id, self._buyer_cancel)

    def buyer_edit(self, order_id: str) -> dict[str, Any] | None:
        """The buyer edits the order (address, delivery): only the revision moves."""
        return self._changed(order_id, self._buyer_edit)

    def set_fulfillment_status(self, order_id: str, status: object) -> dict[str, Any] | None:
        """A change made behind the product's back (the seller, another tool)."""
        checked = one_of(status, FULFILLMENT_STATUSES, "status")

        def seller_change(stored: StoredOrder) -> None:
            if stored.body["fulfillment_status"] != checked:
                stored.body["fulfillment_status"] = checked
                stored.bump()

        return self._changed(order_id, seller_change)

    def _changed(
        self, order_id: str, change: Callable[[StoredOrder], None]
    ) -> dict[str, Any] | None:
        """The order after ``change`` (made under the lock), or None when there is none."""
        with self._lock:
            stored = self._orders.get(order_id)
            if stored is None:
                return None
            change(stored)
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

    def draw_fault(self) -> FaultDraw:
        """The global faults for one contract request: a delay, and maybe a canned answer."""
        with self._lock:
            faults = self._faults
            if self._chance(faults.rate_limit_rate):
                return FaultDraw(faults.latency_s, rate_limited(faults.retry_after_s))
            if self._chance(faults.error_rate):
                return FaultDraw(faults.latency_s, unavailable("injected fault"))
            timeout = faults.timeout_s if self._chance(faults.timeout_rate) else 0.0
            return FaultDraw(faults.latency_s + timeout)

    def get_order(self, order_id: str) -> Reply:
        """A GET after its global faults: the order as read now, answered at once or, for a
        ``hold_get_answers`` order, once its gate opens."""
        with self._lock:
            stored = self._orders.get(order_id)
            if stored is None:
                return not_found(order_id)
            knobs = stored.knobs
            if knobs.not_found_reads:
                knobs.not_found_reads -= 1
                return not_found(order_id)
            if knobs.fail_gets:
                knobs.fail_gets -= 1
                return unavailable("injected GET failure")
            self._advance_readiness(stored)
            stored.answered_reads += 1
            reply = order_reply(stored.served(self._revision_form), knobs)
            self._buyer_after_read(stored)
            gate = None
            if knobs.hold_get_answers:
                knobs.hold_get_answers -= 1
                gate = self._get_gates.setdefault(order_id, threading.Event())
        if gate is not None:
            self._wait_at(gate, self._held_gets, order_id)
        return reply

    def put_fulfillment(self, order_id: str, idempotency_key: str | None, raw: bytes) -> Reply:
        """One PUT from arrival to answer: the Idempotency-Key check (strict mode), the global
        faults, the holds, then the effect. The request is in flight from its arrival until it
        is applied or refused; the delays of its answer come after."""
        body = parse_put_body(raw)
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
        body = parse_put_body(raw)
        with self._lock:
            arrival = self._arrive(order_id, idempotency_key, body)
            if isinstance(arrival, _Claim):
                self._finish(arrival, applied=False)
            self._record_put(order_id, idempotency_key, body, "fault", status)

    def release_puts(self, order_id: str) -> dict[str, Any] | None:
        """Open the gate of a ``hold_puts`` order: held PUTs take effect, later ones pass."""
        return self._release(order_id, "hold_puts", self._gates)

    def release_get_answers(self, order_id: str) -> dict[str, Any] | None:
        """Open the gate of a ``hold_get_answers`` order: held GETs answer what they read,
        later ones answer at once."""
        return self._release(order_id, "hold_get_answers", self._get_gates)

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

    def _release(
        self, order_id: str, knob: str, gates: dict[str, threading.Event]
    ) -> dict[str, Any] | None:
        """Stop holding with the order's ``knob`` and open its gate in ``gates``."""
        with self._lock:
            stored = self._orders.get(order_id)
            if stored is None:
                return None
            setattr(stored.knobs, knob, 0)
            gate = gates.pop(order_id, None)
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
        self, order_id: str, idempotency_key: str | None, body: PutBody
    ) -> _Claim | _Refusal:
        """Strict mode binds a new key to this request, or refuses a request whose key is bound
        to another one, in flight, or already applied; lenient mode lets every request in."""
        binding = None
        if self._strict and idempotency_key:
            fingerprint = body.fingerprint(order_id)
            binding = self._keys.setdefault(idempotency_key, _KeyBinding(fingerprint))
            if binding.fingerprint != fingerprint:
                message = "this Idempotency-Key was first sent with another request"
                return _Refusal(error_reply(422, IDEMPOTENCY_KEY_REUSED, message), "key_reused")
            if binding.in_flight:
                message = "a request with this Idempotency-Key is still being handled"
                reply = error_reply(409, IDEMPOTENCY_KEY_IN_FLIGHT, message, retryable=True)
                return _Refusal(reply, "in_flight")
            if binding.applied:
                return _Refusal(Reply(204), "replayed")
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
    def _advance_readiness(stored: StoredOrder) -> None:
        """Flip a not-yet-paid order to READY once ``ready_after_reads`` answers were given."""
        knobs, body = stored.knobs, stored.body
        if knobs.ready_after_reads and stored.answered_reads >= knobs.ready_after_reads:
            knobs.ready_after_reads = 0
            if body["status"] in _NOT_PAID:
                body["status"] = "READY_FOR_PROCESSING"
                stored.bump()

    def _buyer_after_read(self, stored: StoredOrder) -> None:
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

    def _buyer_edit(self, stored: StoredOrder) -> None:
        stored.bump()
        self._buyer_event(stored, "edit")

    def _buyer_cancel(self, stored: StoredOrder) -> None:
        if stored.body["status"] != "CANCELLED":
            stored.body["status"] = "CANCELLED"
            stored.bump()
            self._buyer_event(stored, "cancel")

    def _buyer_event(self, stored: StoredOrder, kind: str) -> None:
        self._buyer_events.append(
            {
                "order_id": stored.body["id"],
                "kind": kind,
                "at": datetime.now(UTC).isoformat(),
                "revision": stored.revision(self._revision_form),
            }
        )

    def _apply_put(
        self, order_id: str, idempotency_key: str | None, body: PutBody
    ) -> tuple[Reply, str, bool]:
        """The answer, the outcome and whether the fulfillment status changed."""
        stored = self._orders.get(order_id)
        if stored is None:
            return not_found(order_id), "error", False
        if stored.knobs.fail_puts:
            stored.knobs.fail_puts -= 1
            return unavailable("injected PUT failure"), "fault", False
        if not idempotency_key:
            reply = error_reply(422, "MISSING_IDEMPOTENCY_KEY", "Idempotency-Key required")
            return reply, "error", False
        if body.problem is not None:
            return error_reply(422, "INVALID_BODY", body.problem), "error", False
        if idempotency_key in self._applied_keys:  # lenient mode (strict ones stop on arrival)
            return Reply(204), "replayed", False
        revision = stored.revision(self._revision_form)
        if body.expected_revision is None or not same_revision(body.expected_revision, revision):
            message = f"expected revision {body.expected_revision!r}, order is at {revision!r}"
            reply = error_reply(409, REVISION_CONFLICT, message, retryable=True)
            return reply, "conflict", False
        changed = stored.body["fulfillment_status"] != body.status
        stored.body["fulfillment_status"] = body.status
        if changed or not self._strict:  # strict: the revision moves only when the order does
            stored.bump()
        self._applied_keys[idempotency_key] = order_id
        return self._answer_to_applied_put(stored.knobs), "applied", changed

    def _answer_to_applied_put(self, knobs: OrderKnobs) -> Reply:
        """204, unless a knob loses the answer of a PUT that has already taken effect."""
        if knobs.fail_puts_after_apply:
            knobs.fail_puts_after_apply -= 1
            return error_reply(
                502, "BAD_GATEWAY", "backend answer lost after applying", retryable=True
            )
        if knobs.drop_puts_after_apply:
            knobs.drop_puts_after_apply -= 1
            return Reply(204, drop=True)
        delay = knobs.put_latency_s
        if self._chance(self._faults.late_answer_rate):
            delay = max(delay, self._faults.late_answer_s)
        return Reply(204, delay_s=delay)

    def _record_put(
        self,
        order_id: str,
        idempotency_key: str | None,
        body: PutBody,
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

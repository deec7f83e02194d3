"""The fake over HTTP: a threaded server that knows its open connections (so ``stop()`` can
close idle ones), and the handler that routes contract requests to the state and serves the
admin API, each answer in a single write."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from stock_sync.domain.errors import InvalidInput
from stock_sync_fake.orders import reject_unknown
from stock_sync_fake.replies import Reply, encode_response, error_reply, json_reply, not_found
from stock_sync_fake.state import FakeState

_MAX_BODY_BYTES = 10 * 1024 * 1024


class FakeHTTPServer(ThreadingHTTPServer):
    """Threaded server that knows its open connections, so ``stop()`` can close idle ones."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # benchmarks open many connections at once

    def __init__(self, address: tuple[str, int], state: FakeState) -> None:
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


class FakeHTTPServerV6(FakeHTTPServer):
    address_family = socket.AF_INET6


_SENDER_GONE = b"<the sender hung up inside its body>"  # compared by identity


class _Handler(BaseHTTPRequestHandler):
    """Routes contract and admin requests; each answer leaves in a single write."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a pooled client expects
    disable_nagle_algorithm = True  # with one write per answer: no delayed-ACK stalls
    server: FakeHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: one stderr line per request drowns test and demo output."""

    def do_GET(self) -> None:
        self._dispatch()

    do_PUT = do_POST = do_DELETE = do_PATCH = do_GET

    def _dispatch(self) -> None:
        body = self._read_body()
        if body is _SENDER_GONE:
            # The sender hung up inside its body (killed mid-request): no server hands an
            # incomplete request on, so nothing is bound, applied or answered.
            self.close_connection = True
            return
        path = urlsplit(self.path).path
        segments = [unquote(segment) for segment in path.split("/")[1:]]
        try:
            if body is None:
                self.close_connection = True  # the rest of the stream cannot be trusted
                self._send(error_reply(400, "BAD_REQUEST", "unreadable or chunked body"))
            elif segments[:1] == ["v1"]:
                self._contract(segments[1:], body)
            elif segments[:1] == ["_admin"]:
                self._send(self._admin(segments[1:], body))
            else:
                self._send(error_reply(404, "NOT_FOUND", f"no route {self.command} {path}"))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (e.g. its read timeout)

    def _read_body(self) -> bytes | None:
        """The request body; None when it cannot be read safely (chunked, bad length),
        ``_SENDER_GONE`` when the connection ended before Content-Length bytes came."""
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
        body = self.rfile.read(size)
        return body if len(body) == size else _SENDER_GONE

    def _send(self, reply: Reply) -> None:
        if reply.delay_s > 0:
            time.sleep(reply.delay_s)
        if reply.drop:
            self.close_connection = True  # no answer at all: the client sees the socket close
            return
        encoded = encode_response(reply, close=self.close_connection)
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
                self._send(error_reply(404, "NOT_FOUND", f"no route {self.command} {self.path}"))
                return
        if self.command != expected_method:
            message = f"{self.command} not allowed here"
            allow = (("Allow", expected_method),)
            self._send(error_reply(405, "METHOD_NOT_ALLOWED", message, headers=allow))
            return
        self._send(self._answer_contract(order_id, body))

    def _answer_contract(self, order_id: str, body: bytes) -> Reply:
        state = self.server.state
        state.count_request(self.command)
        if self.command == "PUT":  # its key is looked at before the faults: see put_fulfillment
            idempotency_key = (self.headers.get("Idempotency-Key") or "").strip() or None
            return state.put_fulfillment(order_id, idempotency_key, body)
        fault = state.draw_fault()
        if fault.delay_s > 0:
            time.sleep(fault.delay_s)
        return fault.reply if fault.reply is not None else state.get_order(order_id)

    def _admin(self, segments: list[str], body: bytes) -> Reply:
        try:
            return self._admin_route(segments, body)
        except InvalidInput as exc:
            return error_reply(422, "INVALID_REQUEST", str(exc))

    def _admin_route(self, segments: list[str], body: bytes) -> Reply:
        state = self.server.state
        match (self.command, segments):
            case ("GET", ["health"]):
                return json_reply(200, {"status": "ok", "orders": state.order_count()})
            case ("POST", ["orders"]):
                return json_reply(201, {"added": _add_from_json(state, _json_body(body))})
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
                return json_reply(200, {"buyer_events": state.buyer_events()})
            case ("GET", ["mode"]):
                return json_reply(200, {"strict": state.strict()})
            case ("POST", ["mode"]):
                strict = _fields(body, "strict")["strict"]
                return json_reply(200, {"strict": state.set_strict(strict)})
            case ("GET", ["revision_form"]):
                return json_reply(200, {"revision_form": state.revision_form()})
            case ("POST", ["revision_form"]):
                form = _json_object(_json_body(body)).get("revision_form")
                return json_reply(200, {"revision_form": state.set_revision_form(form)})
            case ("GET", ["faults"]):
                return json_reply(200, state.faults())
            case ("POST", ["faults"]):
                return json_reply(200, state.set_faults(_json_object(_json_body(body))))
            case ("GET", ["fulfillments"]):
                return json_reply(200, {"fulfillments": state.fulfillment_requests()})
            case ("GET", ["requests"]):
                return json_reply(200, {"contract_requests": state.contract_requests()})
            case ("POST", ["reset"]):
                state.reset()
                return json_reply(200, {"status": "reset"})
        return error_reply(404, "NOT_FOUND", f"no admin route {self.command} {self.path}")


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
    reject_unknown(payload, names, "request body")
    missing = [name for name in names if name not in payload]
    if missing:
        raise InvalidInput(f"request body: missing {', '.join(missing)}")
    return payload


def _holds_or_404(state: FakeState, order_id: str) -> Reply:
    if state.order(order_id) is None:
        return not_found(order_id)
    holds = {
        "held_puts": state.held_puts(order_id),
        "puts_in_flight": state.puts_in_flight(order_id),
        "held_get_answers": state.held_get_answers(order_id),
    }
    return json_reply(200, holds)


def _add_from_json(state: FakeState, payload: object) -> list[str]:
    """POST /_admin/orders: one order, or ``{"orders": [...]}``."""
    if isinstance(payload, dict) and "orders" in payload and "id" not in payload:
        orders = payload["orders"]
        if not isinstance(orders, list):
            raise InvalidInput("orders must be a list")
        return state.add_orders(orders, {})
    return state.add_orders([payload], {})


def _order_or_404(order_id: str, order: dict[str, Any] | None) -> Reply:
    return not_found(order_id) if order is None else json_reply(200, order)

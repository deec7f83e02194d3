"""The fake's answers: a :class:`Reply` (status, body, and how it is delivered: late, a byte at
a time, or not at all), the contract's error bodies (``stock_sync.adapters.marketplace_contract``)
and the encoding of a whole answer into one write."""

from __future__ import annotations

import functools
import json
import zlib
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from stock_sync.adapters.marketplace_contract import ORDER_NOT_FOUND, error_body
from stock_sync_fake.orders import OrderKnobs

_TRUNCATED_ORDER_JSON = b'{"id": "truncated", "line_items": ['
_BOMB_CHUNK = b"\0" * (1024 * 1024)


@dataclass(frozen=True)
class Reply:
    """One HTTP answer; ``delay_s`` is slept (without the lock) before it is sent; ``drop``
    closes the connection instead of answering; ``trickle_s`` > 0 sends the body one byte at a
    time, this long apart."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    delay_s: float = 0.0
    drop: bool = False
    trickle_s: float = 0.0


def json_reply(status: int, payload: object, **extra: Any) -> Reply:
    return Reply(status, json.dumps(payload, separators=(",", ":")).encode(), **extra)


def error_reply(
    status: int, code: str, message: str, *, retryable: bool = False, **extra: Any
) -> Reply:
    return json_reply(status, error_body(code, message, retryable=retryable), **extra)


def not_found(order_id: str) -> Reply:
    return error_reply(404, ORDER_NOT_FOUND, f"order {order_id} not found")


def unavailable(reason: str) -> Reply:
    return error_reply(503, "SERVICE_UNAVAILABLE", reason, retryable=True)


def rate_limited(retry_after_s: float | None) -> Reply:
    headers = () if retry_after_s is None else (("Retry-After", f"{retry_after_s:g}"),)
    return error_reply(429, "RATE_LIMITED", "too many requests", retryable=True, headers=headers)


def order_reply(body: dict[str, Any], knobs: OrderKnobs) -> Reply:
    if knobs.gzip_bomb_bytes:
        bomb = gzipped_zeros(knobs.gzip_bomb_bytes)
        return Reply(200, bomb, headers=(("Content-Encoding", "gzip"),))
    if knobs.malformed == "json":
        return Reply(200, _TRUNCATED_ORDER_JSON, trickle_s=knobs.trickle_s)
    if knobs.malformed == "contract":
        lines = body["line_items"] or [{"id": "x", "offer_id": "x", "sku": "X", "quantity": 1}]
        body["line_items"] = [{**lines[0], "quantity": 0}, *lines[1:]]
    return json_reply(200, body, trickle_s=knobs.trickle_s)


@functools.lru_cache(maxsize=4)
def gzipped_zeros(size: int) -> bytes:
    """``size`` zero bytes, gzip-compressed a chunk at a time (never all of them in memory)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    parts = []
    for start in range(0, size, len(_BOMB_CHUNK)):
        parts.append(compressor.compress(_BOMB_CHUNK[: min(len(_BOMB_CHUNK), size - start)]))
    parts.append(compressor.flush())
    return b"".join(parts)


def encode_response(reply: Reply, *, close: bool) -> bytes:
    """Status line, headers and body in one buffer, so the answer leaves in one write."""
    phrase = HTTPStatus(reply.status).phrase
    head = [f"HTTP/1.1 {reply.status} {phrase}"]
    if reply.status != 204:  # a 204 carries neither a body nor a Content-Length
        head += ["Content-Type: application/json", f"Content-Length: {len(reply.body)}"]
    head += [f"{name}: {value}" for name, value in reply.headers]
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body

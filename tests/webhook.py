"""A real HTTP endpoint on 127.0.0.1 that records the alert notices POSTed to it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from tests.support import receiving_posts


@dataclass
class Webhook:
    url: str
    answer_status: int = 204
    bodies: list[Any] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)

    def notices(self) -> list[tuple[str, str]]:
        """(rule, notice kind) of every POST, oldest first."""
        return [(body["rule"], body["notice"]) for body in self.bodies]


@contextmanager
def recording_webhook() -> Iterator[Webhook]:
    """A webhook at ``http://127.0.0.1:PORT/hooks/secret-token`` answering ``answer_status``."""
    recorder: Webhook

    def record(path: str, headers: Message, body: bytes) -> int:
        recorder.bodies.append(json.loads(body))
        recorder.content_types.append(headers["Content-Type"])
        return recorder.answer_status

    with receiving_posts(record) as port:
        recorder = Webhook(url=f"http://127.0.0.1:{port}/hooks/secret-token")
        yield recorder

"""A real HTTP endpoint on 127.0.0.1 that records the alert notices POSTed to it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


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

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            recorder.bodies.append(json.loads(self.rfile.read(length)))
            recorder.content_types.append(self.headers["Content-Type"])
            self.send_response(recorder.answer_status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    recorder = Webhook(url=f"http://127.0.0.1:{server.server_port}/hooks/secret-token")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield recorder
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

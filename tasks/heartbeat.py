"""The worker's heartbeat file (stock_sync/adapters/heartbeat.py), as a bootstep of the worker.

A thread of the worker's main process writes the file at start and every interval until the
worker stops, then removes it. It starts with the pool, before the consumer connects to the
broker, and does not depend on it: a broker outage is the broker's alert, and restarting
workers for it would only add to it.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import UTC, datetime
from typing import Any

from celery import bootsteps

from stock_sync.adapters.heartbeat import Heartbeat, remove_heartbeat, write_heartbeat
from stock_sync.adapters.settings import get_settings

logger = logging.getLogger("stock_sync.worker")


class HeartbeatWriter:
    """Writes the heartbeat file every ``interval_s`` in a daemon thread."""

    def __init__(self, path: Any, node: str, interval_s: float) -> None:
        self.path = path
        self.node = node
        self.interval_s = interval_s
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        heartbeat = Heartbeat(datetime.now(UTC), os.getpid(), self.node, self.interval_s)
        try:
            write_heartbeat(self.path, heartbeat)
        except OSError as error:  # a full disk must not take the worker down; the probe sees it
            logger.warning(
                "cannot write the worker heartbeat file %s: %s",
                self.path,
                error.strerror or error,
                extra={"action": "worker_heartbeat_failed"},
            )

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self.beat()

    def start(self) -> None:
        self.beat()
        self._thread = threading.Thread(target=self._run, name="heartbeat-file", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        remove_heartbeat(self.path, os.getpid())


class HeartbeatFile(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """Worker bootstep: the heartbeat writer, started with the pool, stopped with the worker."""

    requires = ("celery.worker.components:Pool",)

    def create(self, w: Any) -> HeartbeatWriter:
        settings = get_settings()
        return HeartbeatWriter(
            settings.effective_worker_heartbeat_file,
            str(getattr(w, "hostname", "") or ""),
            settings.worker_heartbeat_interval_s,
        )

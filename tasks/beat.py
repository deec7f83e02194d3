"""Beat's scheduler: Celery's persistent one, which also records each entry it sends.

The record (maintenance_runs, row ``beat``) is how beat's health is judged: by the last time
beat itself sent an entry, not by whether a worker ran it (that is the maintenance check's
question). It is written by a thread of its own, so a slow or unreachable database never holds
beat's tick: the tick only hands over the latest send.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery.beat import PersistentScheduler

from stock_sync.adapters.db import get_database
from stock_sync.adapters.maintenance_runs import record_beat_send
from stock_sync.adapters.settings import (
    exit_on_configuration_error,
    get_settings,
    prepared_data_dir,
)
from tasks.app import refuse_without_servers

logger = logging.getLogger("stock_sync.beat")
# After a failed write, wait this long before the next try (the next send wakes it anyway).
RETRY_AFTER_S = 5.0


class SendRecorder:
    """Writes the latest send to the database in a daemon thread; the latest send wins."""

    def __init__(self) -> None:
        self._latest: tuple[str, str, datetime] | None = None
        self._lock = threading.Lock()
        self._pending = threading.Event()
        self._thread = threading.Thread(target=self._run, name="beat-sends", daemon=True)
        self._thread.start()

    def sent(self, entry: str, task: str) -> None:
        with self._lock:
            self._latest = (entry, task, datetime.now(UTC))
        self._pending.set()

    def _run(self) -> None:
        while True:
            self._pending.wait()
            self._pending.clear()
            with self._lock:
                latest = self._latest
            if latest is None:
                continue
            try:
                record_beat_send(get_database(), *latest)
            except Exception as error:  # the database's trouble must never stop beat
                logger.warning(
                    "beat could not record its last send: %s: %s",
                    type(error).__name__,
                    error,
                    extra={"action": "beat_send_not_recorded"},
                )
                self._pending.wait(RETRY_AFTER_S)
                self._pending.set()


class RecordingScheduler(PersistentScheduler):  # type: ignore[misc]  # Celery is untyped
    """``celery -A tasks beat``'s scheduler (``beat_scheduler`` in celeryconfig)."""

    _recorder: SendRecorder | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Beat builds its scheduler (its banner a lazy one) before any signal: the first
        # moment to refuse, before it prints or creates anything.
        refuse_without_servers()
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        """Its schedule file's folder first (the data folder unless --schedule says otherwise):
        nothing else creates it, and a bad STOCK_SYNC_DATA_DIR is named."""
        folder = Path(self.schedule_filename).resolve().parent
        settings = get_settings()
        if folder == settings.data_dir.resolve():
            with exit_on_configuration_error():
                prepared_data_dir(settings)
        else:
            folder.mkdir(parents=True, exist_ok=True)
        super().setup_schedule()

    def apply_async(
        self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> Any:
        result = super().apply_async(entry, producer=producer, advance=advance, **kwargs)
        if self._recorder is None:  # made at the first send: beat's banner builds one too
            self._recorder = SendRecorder()
        self._recorder.sent(entry.name, entry.task)  # only once it was sent: a failure raised
        return result

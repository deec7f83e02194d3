"""A worker's heartbeat file: its liveness, read without the broker or the database.

The worker rewrites the file every ``STOCK_SYNC_WORKER_HEARTBEAT_INTERVAL_S`` (a thread of its
main process, started before it connects to the broker: tasks/heartbeat.py), so a probe on the
same host (`stock-sync health --only worker`, a container healthcheck) reads one small file:
the worker is alive while the file is younger than :data:`STALE_AFTER_INTERVALS` intervals.
A worker that stops warmly removes its file; a killed one leaves it to go stale.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# A heartbeat older than this many intervals means the worker is dead or hung.
STALE_AFTER_INTERVALS = 3


@dataclass(frozen=True)
class Heartbeat:
    """One beat: when, by which process (pid, Celery node name), at which interval."""

    written_at: datetime
    pid: int
    node: str
    interval_s: float

    @property
    def stale_after_s(self) -> float:
        return STALE_AFTER_INTERVALS * self.interval_s

    def to_json(self) -> str:
        return json.dumps(
            {
                "written_at": self.written_at.isoformat(),
                "pid": self.pid,
                "node": self.node,
                "interval_s": self.interval_s,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Heartbeat:
        """ValueError when ``text`` is not a heartbeat."""
        try:
            data = json.loads(text)
            written_at = datetime.fromisoformat(data["written_at"])
            beat = cls(written_at, int(data["pid"]), str(data["node"]), float(data["interval_s"]))
        except (TypeError, KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"not a heartbeat: {type(error).__name__}") from None
        if written_at.tzinfo is None:
            raise ValueError("not a heartbeat: its time has no time zone")
        return beat


def write_heartbeat(path: Path, heartbeat: Heartbeat) -> None:
    """Replace ``path`` with ``heartbeat`` in one step (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(heartbeat.to_json())
    os.replace(partial, path)


def read_heartbeat(path: Path) -> Heartbeat | None:
    """The last heartbeat at ``path``; None when there is none; ValueError when unreadable."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    return Heartbeat.from_json(text)


def remove_heartbeat(path: Path, pid: int) -> None:
    """Remove ``path`` if this process (``pid``) wrote it last: a worker stopping warmly says
    it is gone, and leaves another worker's file alone."""
    with contextlib.suppress(ValueError, OSError):
        found = read_heartbeat(path)
        if found is not None and found.pid == pid:
            path.unlink()

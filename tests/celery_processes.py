"""Real ``celery -A tasks worker|beat`` processes for the tests that need more than the
in-process worker: their own process group, their log in a file, stopped by their pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
REPOSITORY = Path(__file__).resolve().parent.parent
# Nothing to sync with or gossip to in a test: skip the second these cost at start.
QUIET_WORKER = ("--without-heartbeat", "--without-mingle", "--without-gossip")


class CeleryProcess:
    """``celery -A tasks ARGS`` started now; ready once ``ready_marker`` shows in its log."""

    def __init__(
        self,
        arguments: Sequence[str],
        environment: dict[str, str],
        log_path: Path,
        ready_marker: str,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.log_path = log_path
        self.process = subprocess.Popen(
            [str(BIN / "celery"), "-A", "tasks", *arguments],
            cwd=REPOSITORY,
            env=environment,
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + start_timeout_s
        while ready_marker not in self.log():
            assert self.process.poll() is None, self.log()[-3000:]
            assert time.monotonic() < deadline, (arguments[0], "did not start", self.log()[-3000:])
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM to its process group (a warm shutdown), SIGKILL if it lingers."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def worker(
    environment: dict[str, str],
    log_path: Path,
    *options: str,
    concurrency: int = 2,
    quiet: bool = True,
) -> CeleryProcess:
    """A threads-pool worker; ``options`` such as ``-Q name`` go to ``celery worker``.

    ``quiet=False`` keeps heartbeats and gossip on, as in production: a worker without them
    (and without task events) has no event dispatcher, so Flower cannot switch its events on.
    """
    arguments = ["worker", "--pool", "threads", "--concurrency", str(concurrency)]
    arguments += ["--loglevel", "INFO", *(QUIET_WORKER if quiet else ()), *options]
    return CeleryProcess(arguments, environment, log_path, "ready.")


def beat(environment: dict[str, str], log_path: Path) -> CeleryProcess:
    """``celery beat`` (its schedule file goes to the environment's STOCK_SYNC_DATA_DIR)."""
    return CeleryProcess(["beat", "--loglevel", "INFO"], environment, log_path, "Starting")


@contextmanager
def stopped_at_exit() -> Iterator[list[CeleryProcess]]:
    """A list to append started processes to; each is stopped on the way out."""
    started: list[CeleryProcess] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            process.stop()

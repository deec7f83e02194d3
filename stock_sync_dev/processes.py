"""Child processes of the tests and the development tools, above all real ``celery -A tasks
worker|beat`` processes: each in its own process group (a prefork worker's children go with
it, and a terminal's Ctrl-C does not reach it), its output in a log file, stopped by its pid.

The one worker-process helper: the test suite's workers (``tests/celery_processes.py``), the
demo's, the benchmark's, the fault suites' and the memory tool's all start through
``ChildProcess`` with ``celery_command`` and ``worker_arguments``; ``stock_sync`` runs the
command line as an operator does."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypedDict, Unpack

REPOSITORY = Path(__file__).resolve().parent.parent
# Nothing to sync with or gossip to in a test or a tool's run: skip the second these cost at
# start. (A worker without them, and without task events, has no event dispatcher: Flower
# cannot switch its events on.)
STOCK_SYNC = Path(sys.executable).with_name("stock-sync")
QUIET_WORKER = ("--without-heartbeat", "--without-mingle", "--without-gossip")


class ProcessError(Exception):
    """A child process exited, or did not get ready in time."""


class ChildProcess:
    """``command`` started now with exactly ``environment``, in a process group of its own,
    stdout and stderr appended to ``log_path`` (unless ``stdout`` says otherwise); with a
    ``ready_marker``, returns once that shows in the log."""

    def __init__(
        self,
        command: Sequence[str],
        environment: dict[str, str],
        log_path: Path,
        *,
        cwd: Path = REPOSITORY,
        stdin: int = subprocess.DEVNULL,
        stdout: int | None = None,
        ready_marker: str | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.command = list(command)
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=cwd,
                env=environment,
                stdout=log if stdout is None else stdout,
                stderr=log,
                stdin=stdin,
                start_new_session=True,
            )
        if ready_marker is not None:
            try:
                self.wait_for_log(ready_marker, start_timeout_s)
            except ProcessError:
                self.kill()  # not left running when it never got ready
                raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_code(self) -> int | None:
        """The exit code once the process has ended, None while it runs."""
        return self.process.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, characters: int = 3000) -> str:
        return self.log()[-characters:]

    def wait_for_log(self, marker: str, timeout_s: float) -> None:
        """Return once ``marker`` shows in the log; ProcessError if the process exits first
        or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while marker not in self.log():
            if self.exit_code() is not None:
                raise ProcessError(f"{' '.join(self.command)} exited:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise ProcessError(f"{' '.join(self.command)} did not start:\n{self.log_tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the whole process group (a prefork worker's children too), then reap."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def stop(self, grace_s: float = 30.0) -> None:
        """Warm shutdown (SIGTERM to the process group), killed if it takes over ``grace_s``;
        safe to call twice."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()


def stock_sync(
    arguments: Sequence[str], environment: dict[str, str], timeout_s: float
) -> subprocess.CompletedProcess[str]:
    """``stock-sync ARGUMENTS`` as an operator runs it (this interpreter's), its output
    captured as text."""
    return subprocess.run(
        [str(STOCK_SYNC), *arguments],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout_s,
    )


def celery_command(arguments: Sequence[str]) -> list[str]:
    """``celery -A tasks ARGUMENTS`` run by this interpreter."""
    return [sys.executable, "-m", "celery", "-A", "tasks", *arguments]


class StartOptions(TypedDict, total=False):
    """``ChildProcess``'s keyword arguments."""

    cwd: Path
    stdin: int
    stdout: int | None
    ready_marker: str | None
    start_timeout_s: float


class CeleryProcess(ChildProcess):
    """``celery -A tasks ARGUMENTS`` (see ``ChildProcess``)."""

    def __init__(
        self,
        arguments: Sequence[str],
        environment: dict[str, str],
        log_path: Path,
        **options: Unpack[StartOptions],
    ) -> None:
        super().__init__(celery_command(arguments), environment, log_path, **options)


def worker_arguments(
    pool: str,
    concurrency: int,
    *options: str,
    loglevel: str | None = "INFO",
    hostname: str | None = None,
    quiet: bool = True,
) -> list[str]:
    """``celery worker`` arguments; ``options`` (``-Q name``, ``--include module``) go last.

    ``loglevel=None`` leaves the level to STOCK_SYNC_LOG_LEVEL; ``quiet=False`` keeps
    heartbeats and gossip on, as in production."""
    arguments = ["worker", "--pool", pool, "--concurrency", str(concurrency)]
    arguments += ["--loglevel", loglevel] if loglevel is not None else []
    arguments += ["--hostname", hostname] if hostname is not None else []
    return [*arguments, *(QUIET_WORKER if quiet else ()), *options]


@contextlib.contextmanager
def stopped_at_exit() -> Iterator[list[ChildProcess]]:
    """A list to append started processes to; each is stopped (last first) on the way out."""
    started: list[ChildProcess] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            process.stop()

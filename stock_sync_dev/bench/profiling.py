"""py-spy profiles of the worker's processes and of the producer during a benchmark run, and a
summary of where their CPU goes.

``py-spy record --gil --format raw`` writes collapsed stacks (``frame;frame;...;leaf count``,
the format speedscope and flamegraph.pl read). ``--gil`` keeps only the thread holding the GIL:
py-spy's own idle detection counts a thread waiting in ``Condition.wait`` or ``epoll`` as busy,
while a thread that holds the GIL is running Python or waiting for a core (C code that
releases the GIL, such as psycopg2 waiting for an answer, and the kernel's time are left out);
the shares are what to read, the role's /proc CPU beside them gives the scale. The summary
splits each role's samples two ways:

- by the library of the innermost Python frame (self time): where the CPU is burnt;
- by what a stack passes through (inclusive, overlapping): what the CPU is spent for.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stock_sync_dev.bench.harness import BenchmarkError, say
from stock_sync_dev.bench.procstat import read_stat, ticks_ms

SAMPLE_RATE = 100  # per second; each sample stops the process for a few microseconds
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy_binary() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise BenchmarkError("py-spy is not installed (make install: it is in the test extra)")
    return found


@contextlib.contextmanager
def recording(folder: Path, roles: dict[str, list[int]], native: bool = False) -> Iterator[None]:
    """py-spy on every pid of ``roles`` while the block runs; ``folder/<role>-<pid>.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    binary = py_spy_binary()
    spies: list[subprocess.Popen[bytes]] = []
    for role, pids in roles.items():
        for pid in pids:
            command = [
                binary, "record", "--pid", str(pid), "--format", "raw", "--rate",
                str(SAMPLE_RATE), "--gil", "--output", str(folder / f"{role}-{pid}.txt"),
                *(["--native"] if native else []),
            ]  # fmt: skip
            log = (folder / f"{role}-{pid}.log").open("wb")
            spies.append(subprocess.Popen(command, stdout=log, stderr=log))
    before = {pid: read_stat(pid) for pids in roles.values() for pid in pids}
    try:
        yield
    finally:
        _write_cpu(folder, roles, before)
        for spy in spies:
            with contextlib.suppress(ProcessLookupError):
                os.kill(spy.pid, signal.SIGINT)  # py-spy writes its output when interrupted
        for spy in spies:
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
    say(f"    profiles written to {folder}")


def _write_cpu(folder: Path, roles: dict[str, list[int]], before: dict[int, Any]) -> None:
    """``folder/<role>.cpu``: the role's user and system CPU (ms) while it was profiled."""
    for role, pids in roles.items():
        user = system = 0.0
        for pid in pids:
            start, end = before.get(pid), read_stat(pid)
            if start is None or end is None:
                continue
            user += ticks_ms(end.user_ticks - start.user_ticks)
            system += ticks_ms((end.ticks - end.user_ticks) - (start.ticks - start.user_ticks))
        (folder / f"{role}.cpu").write_text(json.dumps({"user_ms": user, "system_ms": system}))


# --- the summary ------------------------------------------------------------------------------

# Self time: the library of the innermost frame, by its file path (first match wins).
LIBRARIES = (
    ("Celery, kombu, billiard, amqp, vine", ("celery/", "kombu/", "billiard/", "amqp/", "vine/")),
    ("redis-py", ("redis/",)),
    ("SQLAlchemy", ("sqlalchemy/",)),
    ("psycopg2", ("psycopg2/",)),
    ("logging, JSON logger", ("logging/", "pythonjsonlogger/")),
    ("json (stdlib)", ("json/",)),
    ("requests, urllib3, http.client", ("requests/", "urllib3/", "http/client.py")),
    ("pydantic", ("pydantic/", "pydantic_core/", "pydantic_settings/")),
    ("OpenTelemetry, Sentry", ("opentelemetry/", "sentry_sdk/")),
    ("stock_sync, tasks (ours)", ("stock_sync/", "tasks/", "stock_sync_fake/")),
    ("sockets, selectors, ssl", ("socket.py", "selectors.py", "ssl.py")),
    ("uuid, datetime, copy, enum...", ("uuid.py", "datetime.py", "copy.py", "enum.py")),
    ("threading, queue", ("threading.py", "queue.py")),
)
# Inclusive: a stack counts for each of these it passes through (they overlap).
THROUGH = (
    ("Celery: receiving, tracing, acking a task", ("celery/app/trace.py", "celery/worker/")),
    ("Celery/kombu: publishing (next link, submit)", ("kombu/messaging.py",)),
    ("SQLAlchemy execute (psycopg2 inside)", ("sqlalchemy/engine/base.py",)),
    ("psycopg2 (wait, execute, fetch)", ("psycopg2/",)),
    ("logging (records written or filtered)", ("logging/__init__.py",)),
    ("JSON log formatting", ("pythonjsonlogger/",)),
    ("the event rows (SqlEventStore, counters)", ("stock_sync/adapters/operation_events.py",)),
    ("StandardizedLogger", ("stock_sync/services/standardized_logger.py",)),
    (
        "the HTTP client (MicroserviceClient)",
        (
            "stock_sync/adapters/microservice_client.py",
            "stock_sync/adapters/deadline_session.py",
            "stock_sync/adapters/marketplace_contract.py",
        ),
    ),
    ("requests/urllib3", ("requests/", "urllib3/")),
    ("pydantic", ("pydantic", "pydantic_core")),
    (
        "the stage services",
        (
            "stock_sync/services/stock_synchronization_service.py",
            "stock_sync/services/operation_cancellation_service.py",
            "stock_sync/services/stage_runner.py",
            "stock_sync/services/stage_gate.py",
        ),
    ),
    ("submit_operation", ("stock_sync/producer.py",)),
)


@dataclass(frozen=True)
class Frame:
    function: str
    file: str

    @classmethod
    def parse(cls, text: str) -> Frame:
        match = _FRAME.match(text.strip())
        if match is None:
            return cls(text.strip(), "")
        return cls(match["function"], match["file"])


def read_stacks(path: Path) -> Counter[tuple[Frame, ...]]:
    """The collapsed stacks of a py-spy raw file, root first."""
    stacks: Counter[tuple[Frame, ...]] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks[tuple(Frame.parse(frame) for frame in stack.split(";"))] += int(count)
    return stacks


def _first_match(file: str, groups: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    for name, markers in groups:
        if any(marker in file for marker in markers):
            return name
    return None


def _python_leaf(stack: tuple[Frame, ...]) -> Frame:
    """The innermost frame with a Python file (native frames of --native are skipped)."""
    for frame in reversed(stack):
        if frame.file.endswith(".py"):
            return frame
    return stack[-1]


def summarise(
    stacks: Counter[tuple[Frame, ...]],
    title: str,
    cpu: dict[str, float] | None = None,
    top: int = 12,
) -> str:
    total = sum(stacks.values())
    if not total:
        return f"{title}: no samples"
    by_library: Counter[str] = Counter()
    through: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    for stack, count in stacks.items():
        leaf = _python_leaf(stack)
        by_library[_first_match(leaf.file, LIBRARIES) or "other (stdlib, interpreter)"] += count
        functions[f"{leaf.function} ({leaf.file})"] += count
        passed = {name for frame in stack if (name := _first_match(frame.file, THROUGH))}
        for name in passed:
            through[name] += count

    def share(count: int) -> str:
        return f"{100 * count / total:5.1f}%"

    lines = [f"{title}: {total:,} samples at {SAMPLE_RATE}/s holding the GIL"]
    if cpu:
        lines[0] += (
            f" ({total / SAMPLE_RATE:.1f} s) of {cpu['user_ms'] / 1000:.1f} s user + "
            f"{cpu['system_ms'] / 1000:.1f} s system CPU by /proc (on a busy machine a thread "
            "holding the GIL also waits for a core: read the shares)"
        )
    lines.append("  self time, by the library of the innermost frame:")
    lines += [f"    {share(count)}  {name}" for name, count in by_library.most_common()]
    lines.append("  inclusive, what the stacks pass through (overlapping):")
    lines += [f"    {share(count)}  {name}" for name, count in through.most_common()]
    lines.append(f"  the {top} hottest functions (self time):")
    lines += [f"    {share(count)}  {name}" for name, count in functions.most_common(top)]
    return "\n".join(lines)


def summarise_folder(folder: Path) -> str:
    """One summary per role (the files of a role merged: the pool processes together)."""
    roles: dict[str, Counter[tuple[Frame, ...]]] = {}
    for path in sorted(folder.glob("*.txt")):
        role = path.stem.rsplit("-", 1)[0]
        roles.setdefault(role, Counter()).update(read_stacks(path))

    def cpu(role: str) -> dict[str, float] | None:
        path = folder / f"{role}.cpu"
        return json.loads(path.read_text()) if path.exists() else None

    return "\n\n".join(summarise(stacks, role, cpu(role)) for role, stacks in roles.items())

"""Process statistics from ``/proc``: CPU ticks of a process and its children, memory, and the
CPU of every process a benchmark phase accounts for (worker, producer, PostgreSQL backends,
redis-server, the fake microservice), told apart by role."""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from sqlalchemy import Engine, create_engine, text

from stock_sync.adapters.db import normalise_database_url

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# application_name of each role's connections to the benchmark database
WORKER_APPLICATION_NAME = "stock-sync-bench-worker"
PRODUCER_APPLICATION_NAME = "stock-sync-bench-producer"
HARNESS_APPLICATION_NAME = "stock-sync-bench"
_ROLE_BY_APPLICATION = {
    WORKER_APPLICATION_NAME: "worker",
    PRODUCER_APPLICATION_NAME: "producer",
    HARNESS_APPLICATION_NAME: "harness",
}


@dataclass(frozen=True)
class ProcStat:
    """What ``/proc/<pid>/stat`` says of a process: its CPU in clock ticks (``ticks``: utime +
    stime; ``reaped_ticks``: cutime + cstime, its children that exited and were waited for) and
    its start time (ticks after boot), which tells a reused pid apart."""

    pid: int
    comm: str
    ppid: int
    ticks: int
    reaped_ticks: int
    start: int
    user_ticks: int = 0  # of ``ticks``, in user mode (the rest in the kernel)


def read_stat(pid: int) -> ProcStat | None:
    """The process's stat, or None when it is gone (or not visible from here)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    close = raw.rindex(")")
    fields = raw[close + 2 :].split()  # fields[0] is field 3 of proc(5), "state"
    return ProcStat(
        pid=pid,
        comm=raw[raw.index("(") + 1 : close],
        ppid=int(fields[1]),
        ticks=int(fields[11]) + int(fields[12]),
        reaped_ticks=int(fields[13]) + int(fields[14]),
        start=int(fields[19]),
        user_ticks=int(fields[11]),
    )


def children_of(pid: int) -> list[int]:
    """The pids of the process's live children (``/proc/<pid>/task/*/children``, or a walk of
    /proc for their ppid where the kernel has no such file)."""
    tasks = Path(f"/proc/{pid}/task")
    if (tasks / str(pid) / "children").exists():
        found: list[int] = []
        with contextlib.suppress(OSError):
            for task in tasks.iterdir():
                with contextlib.suppress(OSError):
                    found += [int(child) for child in (task / "children").read_text().split()]
        return found
    candidates = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [child for child in candidates if (stat := read_stat(child)) and stat.ppid == pid]


def family_ticks(pid: int) -> tuple[int, int, int] | None:
    """(the process's own ticks, its children's ticks so far, live children): the children's
    count the live ones and those already reaped, so a child exiting in a phase is not lost."""
    parent = read_stat(pid)
    if parent is None:
        return None
    children = [stat for child in children_of(pid) if (stat := read_stat(child)) is not None]
    return parent.ticks, parent.reaped_ticks + sum(c.ticks for c in children), len(children)


def vm_rss_bytes(pid: int) -> int:
    """VmRSS of ``/proc/<pid>/status`` in bytes (0 when gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class RssSample:
    """The worker's VmRSS (bytes) once ``done`` operations had finished."""

    done: int
    parent: int
    children: int  # the sum over its live pool processes
    alive: int  # how many pool processes

    @property
    def total(self) -> int:
        return self.parent + self.children


def worker_rss(pid: int, done: int) -> RssSample:
    children = children_of(pid)
    return RssSample(
        done, vm_rss_bytes(pid), sum(vm_rss_bytes(child) for child in children), len(children)
    )


def least_squares_slope(points: Sequence[tuple[float, float]]) -> float:
    """The slope of the least-squares line through ``points`` (0 with fewer than two x)."""
    if len({x for x, _ in points}) < 2:
        return 0.0
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in points)
    variance = sum((x - mean_x) ** 2 for x, _ in points)
    return covariance / variance


def ticks_ms(ticks: float) -> float:
    return ticks * 1000 / CLOCK_TICKS_PER_S


# --- the CPU of a phase, by process --------------------------------------------------------

BackendKey = tuple[int, int]  # (pid, start time): a pid reused by a new backend is another one

# The rows of the CPU table, in order; "total" is their sum.
CPU_PARTS = (
    "worker_main",
    "worker_pool",
    "producer",
    "postgres_worker",
    "postgres_producer",
    "redis",
    "fake",
)
CPU_LABELS = {
    "worker_main": "worker main process",
    "worker_pool": "worker pool processes",
    "producer": "producer",
    "postgres_worker": "PostgreSQL backends of the worker",
    "postgres_producer": "PostgreSQL backends of the producer",
    "redis": "redis-server",
    "fake": "fake microservice",
    "total": "total",
}


@dataclass(frozen=True)
class CpuSnapshot:
    """Cumulative CPU ticks of every process a phase accounts for, at one moment (None: not
    visible from here)."""

    worker_main: int
    worker_pool: int
    pool_alive: int
    producer: int | None
    backends: dict[BackendKey, tuple[str, int]]  # role (worker/producer/harness/other), ticks
    postgres_server: int | None
    redis: int | None
    fake: int | None


@dataclass(frozen=True)
class CpuUse:
    """CPU milliseconds spent between two snapshots, by part (``CPU_PARTS``), with what the
    PostgreSQL figures rest on."""

    ms: dict[str, float]
    postgres_other_ms: float  # the harness's polling, autovacuum...
    postgres_server_ms: float | None  # every process of the server, any database
    pool_alive: int
    backends_kept: int
    backends_born: int
    backends_gone: int

    @property
    def total_ms(self) -> float:
        return sum(self.ms.values())

    def per(self, part: str, count: int) -> float:
        value = self.total_ms if part == "total" else self.ms.get(part, 0.0)
        return value / max(count, 1)


def _delta(after: int | None, before: int | None) -> float:
    return ticks_ms(after - before) if after is not None and before is not None else 0.0


def cpu_use(before: CpuSnapshot, after: CpuSnapshot) -> CpuUse:
    by_role: dict[str, float] = dict.fromkeys(("worker", "producer", "harness", "other"), 0.0)
    kept = born = 0
    for key, (role, ticks) in after.backends.items():
        previous = before.backends.get(key)
        if previous is None:
            born += 1  # connected during the phase: all its CPU is the phase's
        else:
            kept += 1
        by_role[role] += ticks_ms(ticks - (previous[1] if previous else 0))
    server = None
    if before.postgres_server is not None and after.postgres_server is not None:
        server = ticks_ms(after.postgres_server - before.postgres_server)
    ms = {
        "worker_main": _delta(after.worker_main, before.worker_main),
        "worker_pool": _delta(after.worker_pool, before.worker_pool),
        "producer": _delta(after.producer, before.producer),
        "postgres_worker": by_role["worker"],
        "postgres_producer": by_role["producer"],
        "redis": _delta(after.redis, before.redis),
        "fake": _delta(after.fake, before.fake),
    }
    return CpuUse(
        ms=ms,
        postgres_other_ms=by_role["harness"] + by_role["other"],
        postgres_server_ms=server,
        pool_alive=after.pool_alive,
        backends_kept=kept,
        backends_born=born,
        backends_gone=len(set(before.backends) - set(after.backends)),
    )


class Probe:
    """Reads the CPU of the processes of a phase through ``/proc``, and finds the PostgreSQL
    backends of the benchmark database through an admin connection (to another database, so
    reading counts nothing in the benchmark database)."""

    def __init__(self, admin_url: str, database_name: str, client: redis.Redis) -> None:
        self._engine: Engine = create_engine(
            normalise_database_url(admin_url), isolation_level="AUTOCOMMIT"
        )
        self._database_name = database_name
        with self._engine.connect() as connection:
            own_backend = int(connection.scalar(text("SELECT pg_backend_pid()")) or 0)
        backend = read_stat(own_backend)
        postmaster = read_stat(backend.ppid) if backend is not None else None
        # None when PostgreSQL runs where this process cannot see it (another host, container)
        self.postmaster_pid = (
            postmaster.pid if postmaster and postmaster.comm == "postgres" else None
        )
        redis_pid = int(client.info("server").get("process_id", 0))
        redis_stat = read_stat(redis_pid)
        self.redis_pid = (
            redis_pid if redis_stat and redis_stat.comm.startswith("redis-server") else None
        )

    def close(self) -> None:
        self._engine.dispose()

    def backends(self) -> dict[BackendKey, tuple[str, int]]:
        """The benchmark database's backends: (pid, start) -> (role, CPU ticks)."""
        if self.postmaster_pid is None:
            return {}
        with self._engine.connect() as connection:
            rows = connection.execute(
                text("SELECT pid, application_name FROM pg_stat_activity WHERE datname = :name"),
                {"name": self._database_name},
            ).all()
        found: dict[BackendKey, tuple[str, int]] = {}
        for pid, application_name in rows:
            stat = read_stat(int(pid))
            if stat is None or stat.ppid != self.postmaster_pid:
                continue  # gone since (or its pid already reused)
            role = _ROLE_BY_APPLICATION.get(application_name, "other")
            found[(stat.pid, stat.start)] = (role, stat.ticks)
        return found

    def _postgres_server(self) -> int | None:
        if self.postmaster_pid is None:
            return None
        family = family_ticks(self.postmaster_pid)
        return None if family is None else family[0] + family[1]

    def cpu(self, worker_pid: int, others: Mapping[str, int | None]) -> CpuSnapshot:
        """A snapshot; ``others``: the pids of the producer and the fake (None: not running)."""
        worker = family_ticks(worker_pid)
        if worker is None:
            raise ProcessLookupError(f"the worker (pid {worker_pid}) is gone")

        def ticks(pid: int | None) -> int | None:
            stat = read_stat(pid) if pid else None
            return stat.ticks if stat else None

        return CpuSnapshot(
            worker_main=worker[0],
            worker_pool=worker[1],
            pool_alive=worker[2],
            producer=ticks(others.get("producer")),
            backends=self.backends(),
            postgres_server=self._postgres_server(),
            redis=ticks(self.redis_pid),
            fake=ticks(others.get("fake")),
        )

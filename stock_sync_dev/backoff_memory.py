"""``python -m stock_sync_dev.backoff_memory`` (``make backoff-rss``): a worker's memory while
thousands of operations wait in backoff.

The microservice answers every request 503 (an outage), so every order's load fails and waits
for its next retry, 5 to 10 minutes away. With the defaults, a wait longer than
``STOCK_SYNC_RETRY_PARK_AFTER_S`` is parked in the operation's row and no message exists for it
until beat releases it; ``--countdowns`` turns parking off (every wait is a countdown message,
which Celery keeps in the worker's memory until it is due), to show what parking saves. One
prefork worker (``-c 2``) and beat run against a private redis-server and a throwaway
database; every ``--every`` seconds a line shows the operations waiting (parked, or as
countdowns) and the worker's resident memory (its main process and pool children, from
/proc). One summary line ends the run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select, text

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import PARKED, PendingStockOperation
from stock_sync.adapters.settings import ENV_PREFIX
from stock_sync.producer import submit_operation
from stock_sync_dev import cli_args
from stock_sync_dev.bench.harness import (
    CeleryProcess,
    Progress,
    configure_this_process,
    run_environment,
    say,
    throwaway_database,
    tool_worker_arguments,
)
from stock_sync_dev.chaos_faults import ChaosRedis
from stock_sync_fake import FakeMicroservice

# Every wait 5-10 minutes (equal jitter of 600 s), so an operation tried once waits for the
# rest of the run; budgets that never run out.
BACKOFF = {
    "RETRY_BACKOFF_BASE_S": "600",
    "RETRY_BACKOFF_MAX_S": "600",
    "MAX_RETRIES_PENDING": "1000",
    "SWEEP_INTERVAL_S": "10",
    "RETRY_RELEASE_INTERVAL_S": "5",
    "ALERT_INTERVAL_S": "3600",
}
PARKING = {"RETRY_PARK_AFTER_S": "30"}  # the default: every wait here is parked
NO_PARKING = {"RETRY_PARK_AFTER_S": "86400"}  # every wait a countdown held by the worker
WORKER_CONCURRENCY = 2


@dataclass(frozen=True)
class Sample:
    elapsed_s: float
    waiting: int  # tried at least once, waiting for the next attempt
    parked: int
    rss_mb: float


def worker_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children (a prefork worker's pool), in MiB."""
    total_kb = 0
    for process in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{process}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(child) for child in (task / "children").read_text().split()]
    return found


def waiting_counts(database: Database) -> tuple[int, int]:
    """Operations tried at least once and waiting for a retry, and how many of them parked."""
    op = PendingStockOperation
    with database.transaction() as session:
        waiting = session.scalar(
            select(func.count()).where(op.status == "pending", op.next_retry_at.is_not(None))
        )
        parked = session.scalar(select(func.count()).where(op.status == "pending", text(PARKED)))
    return int(waiting or 0), int(parked or 0)


@contextlib.contextmanager
def rig(admin_url: str, parking: bool) -> Iterator[tuple[Database, int]]:
    """The servers and the worker of one run; yields the database and the worker's pid."""
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stock-sync-rss-")))
        broker = stack.enter_context(ChaosRedis(workdir))
        url = stack.enter_context(throwaway_database(admin_url, prefix="stock_sync_rss"))
        fake = stack.enter_context(FakeMicroservice())
        fake.set_faults(error_rate=1.0)
        variables = run_environment(
            url, broker.url, fake.url, f"stock-sync-rss-{uuid.uuid4().hex[:6]}", workdir, "off"
        )
        chosen = {**BACKOFF, **(PARKING if parking else NO_PARKING)}
        variables.update({f"{ENV_PREFIX}{name}": value for name, value in chosen.items()})
        configure_this_process(variables)
        database = Database(url)
        stack.callback(database.dispose)
        hostname = f"rss-{uuid.uuid4().hex[:6]}@%h"
        arguments = tool_worker_arguments("prefork", WORKER_CONCURRENCY, hostname)
        worker = CeleryProcess(arguments, variables, workdir / "worker.log")
        stack.callback(worker.stop)
        beat = CeleryProcess(["beat", "--loglevel", "WARNING"], variables, workdir / "beat.log")
        stack.callback(beat.stop)
        say(
            f"    {broker.describe()}, fake {fake.url} (every request 503), worker pid {worker.pid}"
        )
        yield database, worker.pid


def run(operations: int, admin_url: str, parking: bool, every_s: float) -> list[Sample]:
    mode = "parked in the database" if parking else "countdowns held by the worker"
    say(f"[{mode}] {operations:,} orders, every load fails and waits 5-10 min")
    samples: list[Sample] = []
    with rig(admin_url, parking) as (database, worker_pid):
        time.sleep(3)  # the worker's pool up
        started = time.monotonic()
        progress = Progress("submitted", operations)
        for index in range(operations):
            submit_operation(f"rss-{index:06d}", "shop")
            progress.update(index + 1)
        progress.finish(operations)
        next_sample = 0.0
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= next_sample:
                next_sample += every_s
                waiting, parked = waiting_counts(database)
                sample = Sample(elapsed, waiting, parked, worker_rss_mb(worker_pid))
                samples.append(sample)
                say(
                    f"    {elapsed:6.0f} s  waiting in backoff {waiting:>6,} (parked {parked:>6,})"
                    f"  worker RSS {sample.rss_mb:7.1f} MiB"
                )
                settled = [s for s in samples if s.waiting >= operations]
                if len(settled) > 3:  # every operation waits, and has for a while
                    return samples
            time.sleep(0.5)


def summary(parking: bool, samples: Sequence[Sample], operations: int) -> str:
    first = next((s for s in samples if s.waiting > 0), samples[0])
    last = samples[-1]
    peak = max(s.rss_mb for s in samples)
    return (
        f"backoff-rss: mode={'parked' if parking else 'countdowns'} operations={operations} "
        f"in_backoff={last.waiting} parked={last.parked} rss_mib_first={first.rss_mb:.1f} "
        f"rss_mib_last={last.rss_mb:.1f} rss_mib_peak={peak:.1f} "
        f"rss_growth_mib={last.rss_mb - first.rss_mb:.1f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stock_sync_dev.backoff_memory")
    parser.add_argument("--operations", type=int, default=20_000)
    parser.add_argument("--every", type=float, default=15.0, help="seconds between samples")
    parser.add_argument(
        "--countdowns", action="store_true", help="turn parking off (the comparison)"
    )
    cli_args.add_postgres_url(parser, help=None)
    args = parser.parse_args(argv)
    samples = run(args.operations, args.admin_url, not args.countdowns, args.every)
    print(summary(not args.countdowns, samples, args.operations), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark's producer process, as the shop backend would run one:

    python -m stock_sync_dev.bench.producer_main orders FILE [--rate R]
    python -m stock_sync_dev.bench.producer_main batch FILE
    python -m stock_sync_dev.bench.producer_main chains COUNT --done-key KEY

``orders``: ``submit_operation`` for each order id of FILE, one by one (at R per second, open
loop, with ``--rate``); ``batch``: one ``submit_operations`` call for all of them; ``chains``:
COUNT bare chains (4 no-op tasks) sent one by one by name. It connects to the database and the
broker first, prints ``{"ready": true}``, waits for a line on stdin, submits, prints
``{"started", "finished", "submitted", "max_lag_s"}`` (epoch seconds) and exits when stdin
closes, so that its CPU can be read from ``/proc`` after the phase.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import text

ACCOUNT = "bench-shop"


def _connect() -> None:
    """Import and connect everything a submit needs (database and broker), as a long-running
    shop backend would have."""
    from stock_sync.producer import default_services
    from tasks.app import app

    services = default_services()
    with services.database.core_transaction() as connection:
        connection.execute(text("SELECT 1"))
    with app.producer_pool.acquire(block=True) as producer:
        producer.connection.ensure_connection(max_retries=3)


def _orders(path: str) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def submit_one_by_one(order_ids: Sequence[str], rate: float | None) -> float:
    """Each order with ``submit_operation``; at ``rate`` per second (open loop) if given.
    Returns how late it ran behind that schedule at worst (seconds)."""
    from stock_sync.producer import submit_operation

    lag = 0.0
    started = time.monotonic()
    for index, order_id in enumerate(order_ids):
        if rate:
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                lag = max(lag, -delay)
        submit_operation(order_id, ACCOUNT)
    return lag


def submit_batch(order_ids: Sequence[str]) -> float:
    from stock_sync.producer import submit_operations

    submit_operations([(order_id, ACCOUNT) for order_id in order_ids])
    return 0.0


def send_chains(count: int, done_key: str) -> float:
    """``count`` chains of 4 no-op tasks, one by one, sent by name (no task registered here)."""
    from celery import chain

    from stock_sync_dev.bench import NOOP, NOOP_DONE
    from tasks.app import app

    for index in range(count):
        chain(
            app.signature(NOOP, args=(str(index),)),
            app.signature(NOOP),
            app.signature(NOOP),
            app.signature(NOOP_DONE, args=(done_key,)),
        ).apply_async()
    return 0.0


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stock_sync_dev.bench.producer_main")
    parser.add_argument("mode", choices=("orders", "batch", "chains"))
    parser.add_argument("source", help="a file of order ids, or the number of chains")
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--done-key", default="")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    _connect()
    work: Callable[[], float]
    if args.mode == "chains":
        count = int(args.source)
        work = lambda: send_chains(count, args.done_key)  # noqa: E731
    else:
        order_ids = _orders(args.source)
        count = len(order_ids)
        if args.mode == "batch":
            work = lambda: submit_batch(order_ids)  # noqa: E731
        else:
            work = lambda: submit_one_by_one(order_ids, args.rate)  # noqa: E731
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    started = time.time()
    lag = work()
    finished = time.time()
    report = {"started": started, "finished": finished, "submitted": count, "max_lag_s": lag}
    print(json.dumps(report), flush=True)
    sys.stdin.read()  # until the benchmark closes it, having read this process's CPU
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Real ``celery -A tasks worker|beat`` processes for the tests that need more than the
in-process worker, through the one worker-process helper, ``stock_sync_dev.processes``: their
own process group, their log in a file, stopped by their pid."""

from __future__ import annotations

from pathlib import Path

from stock_sync_dev.processes import (
    QUIET_WORKER,
    CeleryProcess,
    stopped_at_exit,
    worker_arguments,
)

__all__ = ["QUIET_WORKER", "CeleryProcess", "beat", "stopped_at_exit", "worker"]


def worker(
    environment: dict[str, str],
    log_path: Path,
    *options: str,
    concurrency: int = 2,
    quiet: bool = True,
) -> CeleryProcess:
    """A threads-pool worker logging at INFO, started once ready; ``options`` such as
    ``-Q name`` go to ``celery worker``.

    ``quiet=False`` keeps heartbeats and gossip on, as in production: a worker without them
    (and without task events) has no event dispatcher, so Flower cannot switch its events on.
    """
    arguments = worker_arguments("threads", concurrency, *options, quiet=quiet)
    return CeleryProcess(arguments, environment, log_path, ready_marker="ready.")


def beat(environment: dict[str, str], log_path: Path) -> CeleryProcess:
    """``celery beat`` (its schedule file goes to the environment's STOCK_SYNC_DATA_DIR)."""
    return CeleryProcess(
        ["beat", "--loglevel", "INFO"], environment, log_path, ready_marker="Starting"
    )

"""Real ``celery -A tasks worker|beat`` processes for the tests that need more than the
in-process worker, through the one worker-process helper, ``stock_sync_dev.processes``: their
own process group, their log in a file, stopped by their pid."""

from __future__ import annotations

import os
from pathlib import Path

from stock_sync_dev.processes import (
    QUIET_WORKER,
    CeleryProcess,
    stopped_at_exit,
    worker_arguments,
)
from stock_sync_fake import FakeMicroservice
from tests.conftest import PIPELINE_ENVIRONMENT, REDIS_URL, run_queue_name

__all__ = [
    "QUIET_WORKER",
    "CeleryProcess",
    "beat",
    "process_environment",
    "stopped_at_exit",
    "worker",
    "worker_arguments",
]


def process_environment(
    database_url: str,
    fake: FakeMicroservice,
    tmp_path: Path,
    queue: str,
    *,
    dropping: tuple[str, ...] = ("STOCK_SYNC_", "SENTRY_", "OTEL_"),
    **variables: str,
) -> dict[str, str]:
    """The environment of a real worker, beat or CLI run against the test database and
    ``fake``: this process's own without the variables whose names start with one of
    ``dropping`` (by default stock-sync's settings and its error reporting's and tracing's),
    the pipeline's quick retries, a run-unique queue named after ``queue``, a data folder in
    ``tmp_path``, and ``variables``."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(dropping)},
        **PIPELINE_ENVIRONMENT,
        "STOCK_SYNC_DATABASE_URL": database_url,
        "STOCK_SYNC_BROKER_URL": REDIS_URL,
        "STOCK_SYNC_MICROSERVICE_URL": fake.url,
        "STOCK_SYNC_QUEUE_NAME": run_queue_name(queue),
        "STOCK_SYNC_DATA_DIR": str(tmp_path / "data"),
        **variables,
    }


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

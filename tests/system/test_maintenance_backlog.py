"""With 5,000 pipeline messages queued, beat's sweep and alert evaluation still run on schedule.

Beat's tasks expire after one interval; in the pipeline's queue they would wait behind the
backlog and expire unrun. They have a queue of their own (celeryconfig.queues), so:

1. a dedicated maintenance worker (``-Q <maintenance queue> --concurrency 1``) runs them on
   schedule while the 5,000 pipeline messages stay queued, untouched;
2. the default worker (no ``-Q``: both queues), busy with that backlog (every pipeline task
   waits on a slow microservice), runs them on schedule as well, between pipeline tasks.

Real processes: ``celery beat`` with 1-second intervals and ``celery worker``, against the test
Redis and PostgreSQL. The runs are read from ``maintenance_runs`` (written by the tasks), the
backlog from Redis at the moment each run is seen.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import insert

import celeryconfig
from stock_sync.adapters.db import Database
from stock_sync.adapters.maintenance_runs import ALERTS, SWEEP, last_runs
from stock_sync.adapters.models import PendingStockOperation
from stock_sync.adapters.settings import Settings
from stock_sync_fake import FakeMicroservice
from tests import celery_processes
from tests.conftest import REDIS_URL
from tests.support import order

pytestmark = pytest.mark.slow

BACKLOG = 5000
INTERVAL_S = 1.0
# "On schedule", without a clock: beat sends each task every interval and the message expires
# one interval later (celeryconfig.maintenance_schedule), so a run that happens at all was
# taken within an interval of being sent. Behind the backlog it would expire unrun.
RUNS = 3  # runs of each task to see in each phase
# Each pipeline task waits this long on the microservice: the backlog of a slow marketplace,
# so the default worker stays busy with it for the whole test.
MICROSERVICE_LATENCY_S = 0.2
# Only how long to wait for the RUNS runs (about RUNS intervals); roomy for a loaded machine.
WATCH_TIMEOUT_S = 60.0


@pytest.fixture
def slow_microservice() -> Iterator[FakeMicroservice]:
    orders = [order(f"backlog-{n}", ("SKU-B", 1)) for n in range(BACKLOG)]
    with FakeMicroservice(orders=orders) as fake:
        fake.set_faults(latency_s=MICROSERVICE_LATENCY_S)
        yield fake


@pytest.fixture
def environment(
    clean_database: Database,
    postgres_url: str,
    slow_microservice: FakeMicroservice,
    tmp_path: Path,
) -> dict[str, str]:
    return celery_processes.process_environment(
        postgres_url,
        slow_microservice,
        tmp_path,
        "backlog",
        STOCK_SYNC_SWEEP_INTERVAL_S=str(INTERVAL_S),
        STOCK_SYNC_ALERT_INTERVAL_S=str(INTERVAL_S),
    )


def queue_backlog(database: Database, environment: dict[str, str]) -> None:
    """BACKLOG pending operations, each with its ``load_line_items`` message queued."""
    ids = [uuid.uuid4() for _ in range(BACKLOG)]
    with database.transaction() as session:
        session.execute(
            insert(PendingStockOperation),
            [
                {"id": i, "order_id": f"backlog-{n}", "account_name": "shop-1"}
                for n, i in enumerate(ids)
            ],
        )
    settings = Settings(
        broker_url=REDIS_URL,
        queue_name=environment["STOCK_SYNC_QUEUE_NAME"],
        data_dir=Path(environment["STOCK_SYNC_DATA_DIR"]),
    )
    producer_app = Celery("backlog-producer", set_as_current=False)
    producer_app.config_from_object(celeryconfig.build(settings))
    with producer_app.producer_or_acquire() as producer:
        for operation_id in ids:
            producer_app.send_task(
                "stock_sync.load_line_items", args=[str(operation_id)], producer=producer
            )


@dataclass(frozen=True)
class SeenRun:
    finished_at: datetime
    ok: bool
    pipeline_queued: int  # messages in the pipeline queue when the run was seen


def watch_runs(
    database: Database, broker: redis.Redis, queue: str, *, timeout_s: float = WATCH_TIMEOUT_S
) -> dict[str, list[SeenRun]]:
    """Poll ``maintenance_runs`` until the sweep and the alert evaluation each ran RUNS times
    from now on; each run with the pipeline queue's length when it was seen."""
    since = datetime.now(UTC)
    seen: dict[str, list[SeenRun]] = {SWEEP: [], ALERTS: []}
    deadline = time.monotonic() + timeout_s
    while any(len(runs) < RUNS for runs in seen.values()):
        assert time.monotonic() < deadline, f"maintenance did not run {RUNS} times: {seen}"
        queued = int(broker.llen(queue))
        with database.transaction() as session:
            latest = last_runs(session)
        for task, runs in seen.items():
            run = latest.get(task)
            if run is None or run.finished_at <= since:
                continue
            if not runs or run.finished_at != runs[-1].finished_at:
                runs.append(SeenRun(run.finished_at, run.ok, queued))
        time.sleep(0.05)
    return seen


def assert_on_schedule(seen: dict[str, list[SeenRun]]) -> None:
    """At least RUNS distinct runs of each task, each ok (see RUNS: each was on time, or it
    would have expired unrun)."""
    for task, runs in seen.items():
        assert len({run.finished_at for run in runs}) >= RUNS, (task, runs)
        assert all(run.ok for run in runs), (task, runs)


def pending_left(database: Database) -> int:
    with database.transaction() as session:
        return session.query(PendingStockOperation).filter_by(status="pending").count()


def test_maintenance_runs_on_schedule_with_5000_pipeline_messages_queued(
    clean_database: Database, environment: dict[str, str], tmp_path: Path
) -> None:
    queue = environment["STOCK_SYNC_QUEUE_NAME"]
    broker = redis.Redis.from_url(REDIS_URL)
    queue_backlog(clean_database, environment)
    assert broker.llen(queue) == BACKLOG

    with celery_processes.stopped_at_exit() as started:
        started.append(celery_processes.beat(environment, tmp_path / "beat.log"))

        # 1. A dedicated maintenance worker: the backlog stays queued, untouched.
        maintenance_only = celery_processes.worker(
            environment,
            tmp_path / "maintenance-worker.log",
            "-Q",
            f"{queue}_maintenance",
            concurrency=1,
        )
        started.append(maintenance_only)
        dedicated = watch_runs(clean_database, broker, queue)
        maintenance_only.stop()

        assert_on_schedule(dedicated)
        # the backlog untouched (the sweep's one probe may wait behind it: services.stuck)
        queued = {run.pipeline_queued for runs in dedicated.values() for run in runs}
        assert queued <= {BACKLOG, BACKLOG + 1}, queued

        # 2. The default worker (both queues), busy with the backlog.
        started.append(celery_processes.worker(environment, tmp_path / "worker.log"))
        shared = watch_runs(clean_database, broker, queue)

        assert_on_schedule(shared)
        assert min(run.pipeline_queued for runs in shared.values() for run in runs) >= 4000
        assert pending_left(clean_database) < BACKLOG  # it did work on the pipeline meanwhile
    print_evidence(dedicated, shared)


def print_evidence(dedicated: dict[str, list[SeenRun]], shared: dict[str, list[SeenRun]]) -> None:
    """What ``pytest -s`` shows: when each run finished and how much was queued then."""
    for name, phase in (("dedicated maintenance worker", dedicated), ("default worker", shared)):
        for task, runs in phase.items():
            shown = ", ".join(
                f"{run.finished_at:%H:%M:%S.%f}"[:-3] + f" ({run.pipeline_queued} queued)"
                for run in runs
            )
            print(f"{name}: {task}: {shown}")

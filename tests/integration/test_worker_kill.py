"""A real worker process killed with SIGKILL mid-stage: after a restart (and, on Redis, a sweep)
the operation completes and its stock is deducted exactly once."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from stock_sync.adapters.db import Database
from stock_sync_dev import processes
from stock_sync_dev.processes import ChildProcess
from stock_sync_fake import FakeMicroservice
from tests import celery_processes
from tests.conftest import BROKER_URL, PIPELINE_ENVIRONMENT, TEST_BROKER, run_queue_name
from tests.support import Pipeline, order, wait_for_lock_waiters

# The shortest stuck threshold the settings accept: the (unenforced, thread pool) hard time
# limit plus the microservice deadline. A dead attempt is found that long after it started; a
# lost message once a probe sent after it came through TASK_TIME_LIMIT_S ago.
TASK_TIME_LIMIT_S = 2
MICROSERVICE_DEADLINE_S = 5
STUCK_AFTER_S = TASK_TIME_LIMIT_S + MICROSERVICE_DEADLINE_S


@pytest.fixture
def worker_environment(
    clean_database: Database, postgres_url: str, fake_microservice: FakeMicroservice
) -> dict[str, str]:
    fake_microservice.reset()
    return {
        **os.environ,
        **PIPELINE_ENVIRONMENT,
        "STOCK_SYNC_DATABASE_URL": postgres_url,
        "STOCK_SYNC_BROKER_URL": BROKER_URL,
        "STOCK_SYNC_MICROSERVICE_URL": fake_microservice.url,
        "STOCK_SYNC_MICROSERVICE_TIMEOUT_S": "5",
        "STOCK_SYNC_QUEUE_NAME": run_queue_name("kill"),
        "STOCK_SYNC_TASK_SOFT_TIME_LIMIT_S": "1",
        "STOCK_SYNC_TASK_TIME_LIMIT_S": str(TASK_TIME_LIMIT_S),
        "STOCK_SYNC_MICROSERVICE_DEADLINE_S": str(MICROSERVICE_DEADLINE_S),
        "STOCK_SYNC_STUCK_AFTER_S": str(STUCK_AFTER_S),
    }


@dataclass
class Workers:
    """The test's real worker processes on ``environment``, in the order they started."""

    started: list[ChildProcess]
    environment: dict[str, str]
    logs: Path

    def start(self) -> None:
        """One more worker, logging to ``worker-N.log`` (N: 1 for the first) in ``logs``."""
        log_path = self.logs / f"worker-{len(self.started) + 1}.log"
        self.started.append(celery_processes.worker(self.environment, log_path))

    def kill_the_first(self) -> None:
        self.started[0].kill()


@pytest.fixture
def workers(worker_environment: dict[str, str], tmp_path: Path) -> Iterator[Workers]:
    """The test's worker processes, stopped after it (before its environment goes)."""
    with celery_processes.stopped_at_exit() as started:
        yield Workers(started, worker_environment, tmp_path)


def cli(environment: dict[str, str], *args: str) -> str:
    result = processes.stock_sync(args, environment, 60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def sweep_until_redriven(
    environment: dict[str, str], operation_id: uuid.UUID, timeout_s: float = 60
) -> dict[str, object]:
    """`stock-sync sweep --json` as beat runs it, each second, until a round re-drives the
    operation (found dead, or lost once a probe has come through): that round's report."""
    deadline = time.monotonic() + timeout_s
    while True:
        report: dict[str, object] = json.loads(cli(environment, "sweep", "--json"))
        if report["redriven"]:
            return report
        assert time.monotonic() < deadline, f"{operation_id} never re-driven: {report}"
        time.sleep(1)


def recover(environment: dict[str, str], operation_id: uuid.UUID, found: str) -> None:
    """Bring back the operation of the killed worker's message, as each broker does.

    Redis keeps a dead worker's unacknowledged message hidden for the visibility timeout (an
    hour): the sweep must re-drive the operation, finding it ``found`` ("lost": a stage that
    leaves no trace when its transaction rolls back, so no retry is charged; "dead": a network
    stage that stamped its attempt, one retry spent). RabbitMQ returns the message to its queue
    as soon as the worker's connection drops: the restarted worker runs it, with no sweep.
    """
    if TEST_BROKER == "rabbitmq":
        return
    report = sweep_until_redriven(environment, operation_id)
    assert report["redriven"] == [str(operation_id)] and report[found] == 1, report


def killed_once_the_put_landed(pipeline: Pipeline, workers: Workers, order_id: str) -> uuid.UUID:
    """Order ``order_id`` (one SKU-K of 5, a slow sync PUT) submitted to a worker that is
    SIGKILLed once the PUT has landed: before its answer reaches the worker, so before the
    row could say COMPLETED. The operation's id."""
    pipeline.set_stock(**{"SKU-K": 5})
    pipeline.fake.add_order(order(order_id, ("SKU-K", 1)), put_latency_s=3.0)
    workers.start()
    operation_id = uuid.UUID(cli(workers.environment, "submit", order_id))
    deadline = time.monotonic() + 30
    while not pipeline.applied_puts(order_id):
        assert time.monotonic() < deadline, "the sync PUT never arrived"
        time.sleep(0.01)
    workers.kill_the_first()
    assert pipeline.operation(operation_id).status == "stock_deducted"
    return operation_id


def test_a_worker_killed_inside_deduct_stock(
    pipeline: Pipeline, workers: Workers, postgres_url: str
) -> None:
    pipeline.set_stock(**{"SKU-K": 5})
    pipeline.fake.add_order(order("kill-deduct", ("SKU-K", 2)))
    workers.start()
    blocker = create_engine(postgres_url).connect()
    blocker_tx = blocker.begin()
    blocker.execute(text("select quantity from stock_levels where sku = 'SKU-K' for update"))
    operation_id = uuid.UUID(cli(workers.environment, "submit", "kill-deduct"))
    wait_for_lock_waiters(pipeline.database, 1)  # the worker is inside deduct_stock's transaction
    workers.kill_the_first()
    blocker_tx.rollback()
    blocker.close()
    time.sleep(0.3)  # the orphaned transaction is rolled back when its client is gone
    assert pipeline.operation(operation_id).status == "processing"
    assert pipeline.stock("SKU-K") == 5

    workers.start()
    recover(workers.environment, operation_id, "lost")
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "completed"
    assert pipeline.stock("SKU-K") == 3
    assert pipeline.movements(operation_id) == [("SKU-K", -2, "deduction")]
    assert pipeline.ledger_matches_stock("SKU-K")


def test_a_worker_killed_while_the_sync_put_is_in_flight(
    pipeline: Pipeline, workers: Workers
) -> None:
    operation_id = killed_once_the_put_landed(pipeline, workers, "kill-sync")

    workers.start()
    recover(workers.environment, operation_id, "dead")
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "completed"
    assert done.fulfillment_status_before_sync == "NEW"  # recorded before the first PUT
    assert pipeline.stock("SKU-K") == 4
    assert pipeline.movements(operation_id) == [("SKU-K", -1, "deduction")]
    outcomes = [
        p["outcome"] for p in pipeline.fake.fulfillment_requests() if p["order_id"] == "kill-sync"
    ]
    assert outcomes == ["applied", "replayed"]  # the retry replays the same Idempotency-Key


def test_a_worker_killed_after_the_sync_put_then_a_cancel_puts_the_marketplace_back(
    pipeline: Pipeline, workers: Workers
) -> None:
    operation_id = killed_once_the_put_landed(pipeline, workers, "kill-cancel")

    cancelled = json.loads(
        cli(workers.environment, "cancel", str(operation_id), "--by", "ops", "--reason", "x",
            "--json")
    )  # fmt: skip
    assert (cancelled["cancelled_from"], cancelled["microservice_rollback"]) == (
        "stock_deducted",
        "pending",
    )
    workers.start()
    pipeline.wait_for(
        [uuid.UUID(i) for i in cancelled["adjustment_operation_ids"]],
        lambda op: op.status == "completed",
    )
    assert pipeline.fake.order("kill-cancel")["fulfillment_status"] == "NEW"
    assert pipeline.stock("SKU-K") == 5 and pipeline.ledger_matches_stock("SKU-K")

"""`stock-sync rollback retry OP_ID`: a failed microservice rollback runs again as a new
adjustment; the failed-rollbacks alert clears once none is left failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import PendingStockOperation, utcnow
from stock_sync.adapters.settings import get_settings
from stock_sync.composition import Services, build_services, get_services
from stock_sync.domain.errors import OperationNotFound, RollbackRetryRefused
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.producer import request_cancellation, submit_operation
from stock_sync.services.alerts import FAILED_ROLLBACKS, run_alert_check
from tests.support import Pipeline, RecordingDispatcher, insert_operation, order
from tests.webhook import recording_webhook

CLI = str(Path(sys.executable).with_name("stock-sync"))
S = OperationStatus
ROLLBACK = OperationType.MICROSERVICE_ROLLBACK.value


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it, against this test run's database and broker."""
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, env=dict(os.environ), timeout=60
    )


def rollbacks_of(database: Database, operation_id: uuid.UUID) -> list[PendingStockOperation]:
    with database.transaction() as session:
        return list(
            session.scalars(
                select(PendingStockOperation)
                .where(
                    PendingStockOperation.parent_operation_id == operation_id,
                    PendingStockOperation.operation_type == ROLLBACK,
                )
                .order_by(PendingStockOperation.created_at)
            )
        )


def failed_rollback(pipeline: Pipeline, order_id: str) -> tuple[uuid.UUID, uuid.UUID]:
    """A completed order, cancelled, whose microservice rollback gave up (every PUT answered
    503); then the marketplace answers again. Returns (operation id, failed rollback id)."""
    pipeline.set_stock(**{"SKU-R": 3})
    pipeline.fake.add_order(order(order_id, ("SKU-R", 1)))
    operation_id = submit_operation(order_id)
    assert pipeline.wait_for([operation_id])[0].status == "completed"
    pipeline.fake.add_order({**pipeline.fake.order(order_id), "fail_puts": 100_000})
    request_cancellation(operation_id, "support", "customer asked")
    (rollback,) = rollbacks_of(pipeline.database, operation_id)
    assert pipeline.wait_for([rollback.id])[0].status == "failed"
    pipeline.fake.add_order({**pipeline.fake.order(order_id), "fail_puts": 0})
    return operation_id, rollback.id


def test_a_failed_rollback_retried_from_the_cli_completes_and_its_alert_resolves(
    pipeline: Pipeline,
) -> None:
    operation_id, failed_id = failed_rollback(pipeline, "retry-e2e")
    assert pipeline.fake.order("retry-e2e")["fulfillment_status"] == "PROCESSING"  # still wrong

    with recording_webhook() as webhook:
        fired = run_alert_check(
            pipeline.database, get_settings(), now=utcnow(), webhook_url=webhook.url
        )
        result = cli("rollback", "retry", str(failed_id), "--json")
        assert result.returncode == 0, result.stderr
        retry = json.loads(result.stdout)
        retry_id = uuid.UUID(retry["retry_rollback_id"])
        assert pipeline.wait_for([retry_id])[0].status == "completed"
        cleared = run_alert_check(
            pipeline.database, get_settings(), now=utcnow(), webhook_url=webhook.url
        )

    assert [alert.rule for alert in fired.alerts] == [FAILED_ROLLBACKS]
    assert fired.alerts[0].sample_operation_ids == [str(failed_id)]
    assert retry == {
        "operation_id": str(operation_id),
        "failed_rollback_id": str(failed_id),
        "retry_rollback_id": str(retry_id),
        "target_fulfillment_status": "NEW",
        "enqueued": True,
    }
    assert pipeline.fake.order("retry-e2e")["fulfillment_status"] == "NEW"
    assert cleared.alerts == []
    assert webhook.notices() == [(FAILED_ROLLBACKS, "firing"), (FAILED_ROLLBACKS, "resolved")]
    for body in webhook.bodies:
        print(json.dumps(body, indent=2))  # shown with `pytest -s`

    assert [r.status for r in rollbacks_of(pipeline.database, operation_id)] == [
        "failed",
        "completed",
    ]
    parent = pipeline.operation(operation_id)
    assert parent.status == "cancelled" and str(retry_id) in (parent.rollback_operations or [])
    assert get_services().cancellation.result_of(operation_id).microservice_rollback == "completed"
    started, completed, done = pipeline.events(operation_id)[-3:]
    assert started.action == "microservice_rollback_started"
    assert f"retry of the failed rollback {failed_id}" in str(started.details)
    assert completed.action == "microservice_rollback_completed"
    assert done.action == "cancellation_completed"
    assert pipeline.stock("SKU-R") == 3 and pipeline.ledger_matches_stock("SKU-R")


def test_the_cancelled_operation_may_be_named_instead_of_its_failed_rollback(
    pipeline: Pipeline,
) -> None:
    operation_id, failed_id = failed_rollback(pipeline, "retry-by-parent")

    retry = get_services().cancellation.retry_microservice_rollback(operation_id)

    assert (retry.operation_id, retry.failed_rollback_id) == (operation_id, failed_id)
    assert pipeline.wait_for([retry.retry_rollback_id])[0].status == "completed"
    assert pipeline.fake.order("retry-by-parent")["fulfillment_status"] == "NEW"


# --- refusals (rows as the pipeline leaves them; nothing is enqueued) -------------------------


class RollbackOnlyDispatcher(RecordingDispatcher):
    def enqueue_pipeline(
        self, operation_id: uuid.UUID, status: OperationStatus, generation: int
    ) -> None:
        raise AssertionError("a retry enqueues no pipeline")


@pytest.fixture
def services(pipeline_environment: str, clean_database: Database) -> Services:
    return build_services(database=clean_database, dispatcher=RollbackOnlyDispatcher())


def cancelled_operation(database: Database, *rollback_statuses: str) -> list[uuid.UUID]:
    """A cancelled order deduction that had synced, with microservice rollbacks in these
    statuses, oldest first. Returns [operation id, rollback ids...]."""
    start = utcnow() - timedelta(minutes=10)
    parent = insert_operation(
        database,
        status=S.CANCELLED,
        fulfillment_status_before_sync="NEW",
        sync_put_sent_at=start,
        created_at=start,
    )
    rollbacks = [
        insert_operation(
            database,
            status=status,
            operation_type=ROLLBACK,
            parent_operation_id=parent,
            target_fulfillment_status="NEW",
            created_at=start + timedelta(minutes=1 + n),
            rollback_seq=1 + n,
        )
        for n, status in enumerate(rollback_statuses)
    ]
    return [parent, *rollbacks]


@pytest.mark.parametrize(
    ("statuses", "named", "refusal"),
    [
        pytest.param(("failed", "pending"), 1, r"rollback \S+ is pending", id="a newer is pending"),
        pytest.param(("failed", "completed"), 1, r"rollback \S+ completed", id="a newer completed"),
        pytest.param(("completed",), 0, r"rollback \S+ completed", id="parent, rollback done"),
        pytest.param(("pending",), 1, "it is pending, not failed", id="the rollback is pending"),
        pytest.param((), 0, "has no microservice rollback", id="parent without a rollback"),
    ],
)
def test_a_retry_is_refused_unless_the_latest_rollback_failed(
    services: Services, statuses: tuple[str, ...], named: int, refusal: str
) -> None:
    ids = cancelled_operation(services.database, *statuses)

    with pytest.raises(RollbackRetryRefused, match=refusal):
        services.cancellation.retry_microservice_rollback(ids[named])

    assert len(rollbacks_of(services.database, ids[0])) == len(statuses)  # nothing written
    assert services.dispatcher.rollbacks == []  # type: ignore[attr-defined]


def test_a_retry_of_anything_else_is_refused(services: Services) -> None:
    completed = insert_operation(services.database, status=S.COMPLETED)
    restoration = insert_operation(
        services.database, status=S.COMPLETED, operation_type="stock_restoration"
    )

    with pytest.raises(RollbackRetryRefused, match="is completed"):
        services.cancellation.retry_microservice_rollback(completed)
    with pytest.raises(RollbackRetryRefused, match="stock_restoration adjustment, not a rollback"):
        services.cancellation.retry_microservice_rollback(restoration)
    with pytest.raises(OperationNotFound):
        services.cancellation.retry_microservice_rollback(uuid.uuid4())


def test_the_latest_failed_rollback_is_retried_even_after_an_earlier_retry_failed(
    services: Services,
) -> None:
    parent, _, second = cancelled_operation(services.database, "failed", "failed")

    retry = services.cancellation.retry_microservice_rollback(parent)

    assert retry.failed_rollback_id == second and retry.enqueued
    assert services.dispatcher.rollbacks == [retry.retry_rollback_id]  # type: ignore[attr-defined]
    new = rollbacks_of(services.database, parent)[-1]
    assert (new.id, new.status, new.target_fulfillment_status) == (
        retry.retry_rollback_id,
        "pending",
        "NEW",
    )


def test_the_cli_refuses_with_one_line(services: Services) -> None:
    _, _, pending = cancelled_operation(services.database, "failed", "pending")

    result = cli("rollback", "retry", str(pending))

    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"error: cannot retry the rollback of {pending}: it is pending, not failed\n"
    )

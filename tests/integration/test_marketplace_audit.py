"""The marketplace audit: it reads the orders of the operations settled lately, reports drift
injected by changing orders in the fake behind the product's back, and repairs it through the
pipeline's own paths."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import pytest
from click.testing import CliRunner

from stock_sync.adapters.models import PendingStockOperation
from stock_sync.composition import Services, audit_for
from stock_sync.domain import stages
from stock_sync.domain.marketplace import Drift, drift_of
from stock_sync.domain.stages import StageOutcome
from stock_sync.entrypoints.cli import cli
from stock_sync.producer import submit_operation
from stock_sync.services.marketplace_audit import MarketplaceAudit, RateLimiter
from stock_sync_fake import FakeMicroservice
from tests.stage_driver import (
    deducted_operation,
    fulfillment,
    outcomes,
    run,
    services_fixture,  # noqa: F401 (the fixture `services`)
    stock,
    the_rollback,
)
from tests.support import Pipeline, order

HOUR = 3600.0


def audit(services: Services) -> MarketplaceAudit:
    """The process's own audit wiring, at the fastest rate and in several batches even for a
    handful of operations."""
    quick = services.settings.model_copy(
        update={"marketplace_audit_rate_per_s": 150, "marketplace_audit_batch_size": 2}
    )
    return audit_for(dataclasses.replace(services, settings=quick))


def completed(services: Services, fake: FakeMicroservice, order_id: str) -> uuid.UUID:
    fake.add_order(order(order_id, ("SKU-F", 1)))
    operation_id = deducted_operation(services, fake, order_id, stock=10)
    assert run(services, stages.SYNC_MICROSERVICE, operation_id) is StageOutcome.DONE
    return operation_id


def status(services: Services, operation_id: uuid.UUID) -> tuple[str, str | None]:
    with services.database.transaction() as session:
        found = session.get(PendingStockOperation, operation_id)
        assert found is not None
        return found.status, found.cancelled_by


# --- the verdict ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "before", "order_status", "fulfillment_status", "expected"),
    [
        ("completed", "NEW", "READY_FOR_PROCESSING", "PROCESSING", None),
        ("completed", "NEW", "READY_FOR_PROCESSING", "NEW", Drift.NOT_SYNCED),
        ("completed", "NEW", "READY_FOR_PROCESSING", "READY_FOR_SHIPMENT", None),  # moved on
        ("completed", "NEW", "READY_FOR_PROCESSING", "SENT", None),
        ("completed", "NEW", "CANCELLED", "NEW", Drift.CANCELLED_UPSTREAM),
        ("cancelled", "NEW", "READY_FOR_PROCESSING", "NEW", None),
        ("cancelled", "NEW", "READY_FOR_PROCESSING", "PROCESSING", Drift.NOT_ROLLED_BACK),
        ("cancelled", "NEW", "READY_FOR_PROCESSING", "SENT", None),  # the seller moved it on
        ("cancelled", "NEW", "CANCELLED", "PROCESSING", None),  # cancelled upstream too
    ],
)
def test_the_drift_verdict(
    operation: str, before: str, order_status: str, fulfillment_status: str, expected: Any
) -> None:
    assert drift_of(operation, before, order_status, fulfillment_status) is expected


def test_the_rate_limiter_spaces_the_reads() -> None:
    now, sleeps = [0.0], []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(4, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        limiter.wait()
    assert sleeps == pytest.approx([0.25] * 4)  # 4 a second: the 5th read at 1 s
    assert RateLimiter(10_000, clock=lambda: 0.0, sleep=sleeps.append)._interval == 1 / 150


# --- drift injected behind the product's back, then repaired --------------------------


def test_a_completed_order_put_back_to_new_is_found_and_synced_again(
    services: Services, fake_microservice: FakeMicroservice
) -> None:
    drifted = completed(services, fake_microservice, "reset-to-new")
    fine = completed(services, fake_microservice, "still-fine")
    fake_microservice.set_fulfillment_status("reset-to-new", "NEW")  # someone else's tool

    found = audit(services).run(since_s=HOUR, repair=False)
    assert found.checked == 2 and not found.agrees
    assert [(f.operation_id, f.drift) for f in found.drift] == [(drifted, Drift.NOT_SYNCED)]
    assert fulfillment(fake_microservice, "reset-to-new") == "NEW"  # a report changes nothing

    repaired = audit(services).run(since_s=HOUR, repair=True)
    assert repaired.agrees and repaired.repaired == 1
    assert fulfillment(fake_microservice, "reset-to-new") == "PROCESSING"
    assert audit(services).run(since_s=HOUR, repair=False).drift == []
    puts = [p for p in fake_microservice.fulfillment_requests() if p["order_id"] == "reset-to-new"]
    assert puts[-1]["outcome"] == "applied"  # under a key of its own (a new revision)
    assert len({p["idempotency_key"] for p in puts}) == len(puts)
    assert status(services, fine)[0] == "completed"


def test_a_cancelled_order_still_synced_is_found_and_rolled_back_again(
    services: Services, fake_microservice: FakeMicroservice
) -> None:
    operation_id = completed(services, fake_microservice, "resynced-by-someone")
    services.cancellation.cancel_operation(operation_id, "operator", "customer called")
    assert run(services, stages.ROLLBACK, the_rollback(services)) is StageOutcome.DONE
    fake_microservice.set_fulfillment_status("resynced-by-someone", "PROCESSING")

    report = audit(services).run(since_s=HOUR, repair=True)

    assert [f.drift for f in report.drift] == [Drift.NOT_ROLLED_BACK] and report.agrees
    rollbacks = services.dispatcher.rollbacks  # type: ignore[attr-defined]
    assert len(rollbacks) == 2  # the cancel's, then the repair's
    assert run(services, stages.ROLLBACK, rollbacks[-1]) is StageOutcome.DONE
    assert fulfillment(fake_microservice, "resynced-by-someone") == "NEW"


def test_a_completed_order_cancelled_upstream_gets_its_stock_back_without_a_put(
    services: Services, fake_microservice: FakeMicroservice
) -> None:
    operation_id = completed(services, fake_microservice, "buyer-cancelled-late")
    assert stock(services, "SKU-F") == 9
    puts_before = outcomes(fake_microservice, "buyer-cancelled-late")
    fake_microservice.cancel_order("buyer-cancelled-late")

    report = audit(services).run(since_s=HOUR, repair=True)

    assert [f.drift for f in report.drift] == [Drift.CANCELLED_UPSTREAM] and report.agrees
    assert status(services, operation_id) == ("cancelled", "marketplace")
    assert stock(services, "SKU-F") == 10
    assert outcomes(fake_microservice, "buyer-cancelled-late") == puts_before  # no PUT
    assert services.dispatcher.rollbacks == []  # type: ignore[attr-defined]


def test_moved_on_orders_and_orders_outside_the_window_are_no_drift(
    services: Services, fake_microservice: FakeMicroservice
) -> None:
    completed(services, fake_microservice, "shipped")
    fake_microservice.set_fulfillment_status("shipped", "READY_FOR_SHIPMENT")
    old = completed(services, fake_microservice, "long-ago")
    fake_microservice.set_fulfillment_status("long-ago", "NEW")
    with services.database.transaction() as session:
        found = session.get(PendingStockOperation, old)
        assert found is not None and found.completed_at is not None
        found.completed_at = found.completed_at.replace(year=found.completed_at.year - 1)

    report = audit(services).run(since_s=HOUR, repair=True)
    assert (report.checked, report.drift) == (1, [])


def test_an_unreadable_order_is_reported_not_drift(
    services: Services, fake_microservice: FakeMicroservice
) -> None:
    completed(services, fake_microservice, "gone")
    fake_microservice.reset()  # the fake forgot it: 404
    report = audit(services).run(since_s=HOUR, repair=True)
    assert report.drift == [] and len(report.unreadable) == 1 and report.agrees


# --- the command line -------------------------------------------------------------------


def test_check_marketplace_reports_then_repairs(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-C": 5})
    operation_id = pipeline.submit(order("cli-drift", ("SKU-C", 1)))
    (done,) = pipeline.wait_for([operation_id])
    assert done.status == "completed"
    pipeline.fake.set_fulfillment_status("cli-drift", "NEW")
    runner = CliRunner()

    found = runner.invoke(cli, ["check", "--marketplace", "--since", "1h", "--json"])
    assert found.exit_code == 1, found.output
    report = json.loads(found.stdout)
    assert (report["checked"], report["drift"], report["repaired"]) == (1, 1, 0)
    assert report["found"][0]["drift"] == "not_synced"

    repaired = runner.invoke(cli, ["check", "--marketplace", "--since", "1h", "--repair"])
    assert repaired.exit_code == 0, repaired.output
    assert "1 drift, 1 repaired" in repaired.stdout
    assert pipeline.fake.order("cli-drift")["fulfillment_status"] == "PROCESSING"


def test_the_beat_task_repairs_and_its_counts_are_the_drift_metric(pipeline: Pipeline) -> None:
    from stock_sync.adapters.models import utcnow
    from stock_sync.composition import get_services
    from stock_sync.entrypoints.metrics_exposition import render_prometheus
    from stock_sync.services.metrics import read_metrics
    from tasks.maintenance import marketplace_audit_task

    pipeline.set_stock(**{"SKU-C": 5})
    pipeline.fake.add_order(order("beat-drift", ("SKU-C", 1)))
    (done,) = pipeline.wait_for([submit_operation("beat-drift")])
    assert done.status == "completed"
    pipeline.fake.set_fulfillment_status("beat-drift", "NEW")

    summary = marketplace_audit_task()

    assert (summary["drift"], summary["repaired"]) == (1, 1)
    assert pipeline.fake.order("beat-drift")["fulfillment_status"] == "PROCESSING"
    services = get_services()
    snapshot = read_metrics(pipeline.database, services.settings, now=utcnow())
    assert snapshot.marketplace_drift == {"found": 1, "unrepaired": 0}
    exposition = render_prometheus(snapshot)
    assert 'stock_sync_marketplace_drift{state="found"} 1.0' in exposition

"""No decision compares two hosts' clocks: a worker whose clock runs an hour ahead makes an
operation's first microservice rollback; a second, made on a host with the right clock, is
still the latest (its number is taken under the parent's row lock), for the retry command and
for the failed-rollbacks metric alike."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import PendingStockOperation, utcnow
from stock_sync.composition import Services
from stock_sync.domain import stages
from stock_sync.domain.errors import RollbackRetryRefused
from stock_sync.domain.stages import StageOutcome
from stock_sync.services import operations
from stock_sync.services.metrics import read_metrics
from stock_sync_fake import FakeMicroservice
from tests.stage_driver import deducted_operation, make_services, run
from tests.support import order

SKEW = timedelta(hours=1)


@pytest.fixture
def services(
    clean_database: Database, fake_microservice: FakeMicroservice, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Services]:
    # no retry parked in the database: the test runs each one itself until the rollback FAILS
    monkeypatch.setenv("STOCK_SYNC_RETRY_PARK_AFTER_S", "86400")
    fake_microservice.reset()
    built = make_services(clean_database, fake_microservice)
    yield built
    built.client.close()


def created(services: Services, operation_id: uuid.UUID) -> datetime:
    query = select(PendingStockOperation.created_at).where(PendingStockOperation.id == operation_id)
    with services.database.transaction() as session:
        return session.execute(query).scalar_one()


def test_the_latest_rollback_is_the_last_made_whatever_the_clocks(
    services: Services, fake_microservice: FakeMicroservice, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_microservice.add_order(order("skewed", ("SKU-F", 1)))
    operation_id = deducted_operation(services, fake_microservice, "skewed")
    assert run(services, stages.SYNC_MICROSERVICE, operation_id) is StageOutcome.DONE

    with monkeypatch.context() as ahead:  # the host that cancels: its clock an hour ahead
        ahead.setattr(operations, "utcnow", lambda: utcnow() + SKEW)
        services.cancellation.cancel_operation(operation_id, "operator", "on the skewed host")
    (first,) = services.dispatcher.rollbacks  # type: ignore[attr-defined]
    fake_microservice.set_faults(error_rate=1.0)  # every rollback attempt fails: FAILED
    while services.synchronization.execute(stages.ROLLBACK, first).retry_in_s is not None:
        pass
    fake_microservice.set_faults(error_rate=0.0)
    assert read_metrics(services.database, services.settings, now=utcnow()).failed_rollbacks == 1

    retry = services.cancellation.retry_microservice_rollback(first)  # the right clock
    assert created(services, retry.retry_rollback_id) < created(services, first)  # skew shows

    # the newer one is the latest: the failed first is resolved, a second retry is refused
    with pytest.raises(RollbackRetryRefused, match="is pending"):
        services.cancellation.retry_microservice_rollback(operation_id)
    metrics = read_metrics(services.database, services.settings, now=utcnow())
    assert metrics.failed_rollbacks == 0
    assert run(services, stages.ROLLBACK, retry.retry_rollback_id) is StageOutcome.DONE
    assert fake_microservice.order("skewed")["fulfillment_status"] == "NEW"

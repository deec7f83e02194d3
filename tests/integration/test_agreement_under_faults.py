"""Agreement under faults, one forced interleaving per defect: once an operation settles, the
stock, the ledger and the marketplace's fulfillment status agree with its final status.

The stages run here in the test thread, called one by one in the order a fault would put them
in (a lost answer, a cancel during the backoff, a PUT held at the fake's gate until after the
rollback read the order), against real PostgreSQL and the fake microservice over HTTP.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import func, select

from stock_sync import producer
from stock_sync.adapters.db import Database
from stock_sync.adapters.microservice_client import MicroserviceClient
from stock_sync.adapters.models import PendingStockOperation
from stock_sync.adapters.stock_ledger import set_stock
from stock_sync.composition import Services
from stock_sync.domain import stages
from stock_sync.domain.idempotency import RecordedPut
from stock_sync.domain.revisions import revision_from_text
from stock_sync.domain.stages import StageOutcome
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.producer import submit_operation
from stock_sync_fake import FakeMicroservice
from tests.stage_driver import (
    CLIENT_TIMEOUT_S,
    deducted_operation,
    effective_puts,
    fulfillment,
    make_services,
    outcomes,
    run,
    services_fixture,  # noqa: F401 (the fixture `services`)
    stock,
    the_rollback,
    wait_for_outcome,
)
from tests.support import order

S = OperationStatus


class SoftLimitAfterPutClient(MicroserviceClient):
    """The soft time limit fires just after the sync's PUT took effect, before its answer is
    used (once: the rollback's claim of the same PUT then runs to its end)."""

    fired = False

    def set_fulfillment_status(self, order_id: str, **kwargs: Any) -> None:
        super().set_fulfillment_status(order_id, **kwargs)
        if kwargs["status"] == "PROCESSING" and not self.fired:
            self.fired = True
            raise SoftTimeLimitExceeded()


# --- 1. a cancellation between two sync attempts --------------------------------------------


LOST_ANSWERS = {
    "answer slower than the client timeout": {"put_latency_s": CLIENT_TIMEOUT_S * 3},
    "connection reset after sending": {"drop_puts_after_apply": 1},
    "gateway 5xx after the backend applied it": {"fail_puts_after_apply": 1},
}


@pytest.mark.parametrize("knobs", LOST_ANSWERS.values(), ids=LOST_ANSWERS.keys())
def test_a_cancel_between_two_sync_attempts_rolls_back_a_put_whose_answer_was_lost(
    services: Services, fake_microservice: FakeMicroservice, knobs: dict[str, Any]
) -> None:
    fake_microservice.add_order(order("lost-answer", ("SKU-F", 2)), **knobs)
    operation_id = deducted_operation(services, fake_microservice, "lost-answer")

    first_attempt = services.synchronization.execute(stages.SYNC_MICROSERVICE, operation_id)
    assert first_attempt.retry_in_s is not None  # the answer was lost: a retry is scheduled
    assert fulfillment(fake_microservice, "lost-answer") == "PROCESSING"  # but the PUT landed
    fake_microservice.add_order(fake_microservice.order("lost-answer"))  # the fault has passed

    result = services.cancellation.cancel_operation(operation_id, "operator", "during backoff")
    assert (result.cancelled_from, result.microservice_rollback) == (S.STOCK_DEDUCTED, "pending")
    assert run(services, stages.ROLLBACK, the_rollback(services)) is StageOutcome.DONE
    assert run(services, stages.SYNC_MICROSERVICE, operation_id) is StageOutcome.STOPPED

    assert fulfillment(fake_microservice, "lost-answer") == "NEW"
    assert effective_puts(fake_microservice, "lost-answer", "PROCESSING") == 1
    assert stock(services, "SKU-F") == 5
    assert services.cancellation.result_of(operation_id).microservice_rollback == "completed"


def test_a_soft_time_limit_after_the_put_is_rolled_back_by_the_cancel(
    clean_database: Database, fake_microservice: FakeMicroservice
) -> None:
    fake_microservice.reset()
    services = make_services(clean_database, fake_microservice, SoftLimitAfterPutClient)
    fake_microservice.add_order(order("soft-limit", ("SKU-F", 2)))
    operation_id = deducted_operation(services, fake_microservice, "soft-limit")

    attempt = services.synchronization.execute(stages.SYNC_MICROSERVICE, operation_id)
    assert attempt.retry_in_s is not None
    services.cancellation.cancel_operation(operation_id, "operator", "after the time limit")
    assert run(services, stages.ROLLBACK, the_rollback(services)) is StageOutcome.DONE

    assert fulfillment(fake_microservice, "soft-limit") == "NEW"


def test_a_sync_put_held_at_the_wrapper_makes_the_rollback_wait_then_put_it_back(
    services: Services, fake_microservice: FakeMicroservice
) -> None:
    """The sync PUT waits in the wrapper's queue (in flight) when the operation is cancelled:
    the rollback's claim of its key answers 409 in flight, so the rollback retries instead of
    reading the order; once the held PUT has landed, the claim is a replay and the rollback
    finds PROCESSING and puts it back."""
    fake_microservice.add_order(order("late-put", ("SKU-F", 2)), hold_puts=1)
    operation_id = deducted_operation(services, fake_microservice, "late-put")

    attempt = services.synchronization.execute(stages.SYNC_MICROSERVICE, operation_id)
    assert attempt.retry_in_s is not None  # timed out: the PUT waits at the fake's gate
    assert fake_microservice.held_puts("late-put") == 1
    services.cancellation.cancel_operation(operation_id, "operator", "while the PUT is held")
    rollback_id = the_rollback(services)
    waiting = services.synchronization.execute(stages.ROLLBACK, rollback_id)
    assert waiting.retry_in_s is not None  # the claim met the held PUT in flight
    assert outcomes(fake_microservice, "late-put")[-1] == "in_flight"
    assert fulfillment(fake_microservice, "late-put") == "NEW"

    fake_microservice.release_puts("late-put")  # the held PUT lands now...
    wait_for_outcome(fake_microservice, "late-put", "applied")
    assert fulfillment(fake_microservice, "late-put") == "PROCESSING"
    assert run(services, stages.ROLLBACK, rollback_id) is StageOutcome.DONE  # ...and is undone

    assert fulfillment(fake_microservice, "late-put") == "NEW"
    assert outcomes(fake_microservice, "late-put")[-2:] == ["replayed", "applied"]


def test_a_replayed_sync_put_has_no_effect_after_the_rollback(
    services: Services, fake_microservice: FakeMicroservice
) -> None:
    fake_microservice.add_order(order("replayed", ("SKU-F", 2)), fail_puts=1)
    operation_id = deducted_operation(services, fake_microservice, "replayed")
    attempt = services.synchronization.execute(stages.SYNC_MICROSERVICE, operation_id)
    assert attempt.retry_in_s is not None  # 503: it may or may not have landed
    services.cancellation.cancel_operation(operation_id, "operator", "after a 503")
    assert run(services, stages.ROLLBACK, the_rollback(services)) is StageOutcome.DONE

    with services.database.transaction() as session:
        recorded = session.get(PendingStockOperation, operation_id)
        assert recorded is not None and recorded.sync_puts
        (put,) = [RecordedPut.from_dict(raw) for raw in recorded.sync_puts]
    # the same PUT, sent again by anyone (a copy a proxy held): the rollback claimed its key
    # first, so it is a replay with no effect
    services.client.set_fulfillment_status(
        "replayed",
        status="PROCESSING",
        expected_revision=revision_from_text(put.expected_revision),
        idempotency_key=put.key,
    )
    assert fulfillment(fake_microservice, "replayed") == "NEW"
    assert [p["outcome"] for p in fake_microservice.fulfillment_requests()][-1] == "replayed"


def test_a_rollback_after_a_put_that_never_left_ends_at_the_status_before_the_sync(
    services: Services, fake_microservice: FakeMicroservice
) -> None:
    """The rollback cannot know the PUT never left, so it claims its key: the claim applies
    it, and the rollback puts the status back. The marketplace ends where it was, and the
    key is answered: no copy can land later."""
    fake_microservice.add_order(order("never-left", ("SKU-F", 2)), fail_puts=1)
    operation_id = deducted_operation(services, fake_microservice, "never-left")
    services.synchronization.execute(stages.SYNC_MICROSERVICE, operation_id)
    services.cancellation.cancel_operation(operation_id, "operator", "after a 503")
    assert run(services, stages.ROLLBACK, the_rollback(services)) is StageOutcome.DONE

    assert fulfillment(fake_microservice, "never-left") == "NEW"
    assert effective_puts(fake_microservice, "never-left", "PROCESSING") == 1  # the claim
    assert effective_puts(fake_microservice, "never-left", "NEW") == 1  # put back


def wait_until_released(fake: FakeMicroservice, order_id: str) -> None:
    deadline = threading.Event()
    for _ in range(500):
        if fake.held_puts(order_id) == 0 and any(
            p["status"] == "PROCESSING" for p in fake.fulfillment_requests()
        ):
            return
        deadline.wait(0.01)
    raise AssertionError("the held PUT never finished")


# --- 2. two submits of one order -------------------------------------------------------------


def test_two_racing_submits_with_and_without_an_account_make_one_operation(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both submits reach their INSERT at once: the unique index lets one in; the other's
    INSERT waits for it, does nothing, and its look-up returns the winner's operation."""
    both_ready = threading.Barrier(2, timeout=10)
    pending = producer.NewOperation.pending
    look_up = producer._existing
    looks: list[uuid.UUID | None] = []  # every look-up, in the order they answered
    past_the_barrier: list[str] = []  # the race happened only if both submits got here

    def pending_then_wait(*args: Any) -> Any:
        row = pending(*args)
        both_ready.wait()  # both built their row: both INSERTs go at once
        past_the_barrier.append(threading.current_thread().name)
        return row

    def recorded_look_up(*args: Any) -> uuid.UUID | None:
        found = look_up(*args)
        looks.append(found)
        return found

    monkeypatch.setattr(producer.NewOperation, "pending", pending_then_wait)
    monkeypatch.setattr(producer, "_existing", recorded_look_up)

    def submit(account: str | None) -> uuid.UUID:
        return submit_operation("twice", account, services=services)

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {str(a): pool.submit(submit, a) for a in (None, "shop")}
        results = {name: future.result(timeout=30) for name, future in futures.items()}

    assert len(set(past_the_barrier)) == 2, past_the_barrier
    assert results["None"] == results["shop"]
    assert looks == [results["None"]]  # only the loser looked, and found the winner's
    with services.database.transaction() as session:
        count = session.scalar(
            select(func.count()).where(PendingStockOperation.order_id == "twice")
        )
    assert count == 1


# --- 5. retry budgets ----------------------------------------------------------------------------


def test_deduct_stock_keeps_its_budget_after_validation_used_its_own(
    services: Services, fake_microservice: FakeMicroservice
) -> None:
    fake_microservice.add_order(order("slow-stock", ("SKU-F", 2)))
    with services.database.transaction() as session:
        set_stock(session, "SKU-F", 1)
    operation_id = submit_operation("slow-stock", services=services)
    run(services, stages.LOAD_LINE_ITEMS, operation_id)
    with services.database.transaction() as session:
        row = session.get(PendingStockOperation, operation_id)
        assert row is not None
        row.retry_count = services.settings.max_retries_processing  # validation waited it out

    result = services.synchronization.execute(stages.DEDUCT_STOCK, operation_id)

    assert result.retry_in_s is not None
    with services.database.transaction() as session:
        row = session.get(PendingStockOperation, operation_id)
        assert row is not None and (row.status, row.deduction_retry_count) == ("processing", 1)


def test_the_microservice_rollback_has_its_own_retry_limit(
    services: Services, fake_microservice: FakeMicroservice, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STOCK_SYNC_MAX_RETRIES_PENDING", "5")
    monkeypatch.setenv("STOCK_SYNC_MAX_RETRIES_ROLLBACK", "1")
    services = make_services(services.database, fake_microservice, MicroserviceClient)
    fake_microservice.add_order(order("stubborn", ("SKU-F", 2)), fail_puts=100)
    operation_id = deducted_operation(services, fake_microservice, "stubborn")
    services.synchronization.execute(stages.SYNC_MICROSERVICE, operation_id)
    services.cancellation.cancel_operation(operation_id, "operator", "rollback will fail")
    rollback_id = the_rollback(services)

    outcomes = [services.synchronization.execute(stages.ROLLBACK, rollback_id) for _ in range(2)]

    assert [o.retry_in_s is not None for o in outcomes] == [True, False]
    with services.database.transaction() as session:
        rollback = session.get(PendingStockOperation, rollback_id)
        assert rollback is not None
        assert (rollback.operation_type, rollback.status, rollback.retry_count) == (
            OperationType.MICROSERVICE_ROLLBACK.value,
            "failed",
            1,
        )

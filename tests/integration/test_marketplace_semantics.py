"""The marketplace as it really behaves, one deterministic test per case the issue names: on the
strict fake (a revision that moves only on change, a key bound to its first body, buyer edits
and cancellations, requests applied after their sender gave up), the stages run one by one in
the test thread in the order the case puts them in."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import PendingStockOperation
from stock_sync.composition import Services
from stock_sync.domain import stages
from stock_sync.domain.idempotency import RecordedPut, sync_key
from stock_sync.domain.revisions import revision_to_text
from stock_sync.domain.stages import StageOutcome
from stock_sync.domain.statuses import OperationStatus
from stock_sync_fake import FakeMicroservice
from tests.stage_driver import (
    HoldingProxy,
    deducted_operation,
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


@pytest.fixture
def strict_fake(fake_microservice: FakeMicroservice) -> FakeMicroservice:
    fake_microservice.reset()
    assert fake_microservice.strict  # the tests' default: Allegro's semantics
    return fake_microservice


def row(services: Services, operation_id: uuid.UUID) -> PendingStockOperation:
    with services.database.transaction() as session:
        found = session.get(PendingStockOperation, operation_id)
        assert found is not None
        return found


def puts_of(fake: FakeMicroservice, order_id: str) -> list[dict[str, object]]:
    return [p for p in fake.fulfillment_requests() if p["order_id"] == order_id]


def no_key_reused(fake: FakeMicroservice) -> bool:
    return all(p["outcome"] != "key_reused" for p in fake.fulfillment_requests())


# --- 1. a buyer's edit between the load and the sync ------------------------------------


def test_1_a_buyer_edit_between_the_load_and_the_sync_is_synced_under_a_new_key(
    services: Services, strict_fake: FakeMicroservice
) -> None:
    strict_fake.add_order(order("edited", ("SKU-F", 2)), edit_after_reads=1)  # after the load
    operation_id = deducted_operation(services, strict_fake, "edited")

    assert run(services, stages.SYNC_MICROSERVICE, operation_id) is StageOutcome.DONE

    puts = puts_of(strict_fake, "edited")
    assert [p["outcome"] for p in puts] == ["conflict", "applied"]
    assert puts[0]["idempotency_key"] != puts[1]["idempotency_key"]  # one key per payload
    assert no_key_reused(strict_fake)
    done = row(services, operation_id)
    assert done.status == "completed" and fulfillment(strict_fake, "edited") == "PROCESSING"
    current = revision_to_text(strict_fake.order("edited")["revision"])
    assert done.sync_puts is not None and len(done.sync_puts) == 2  # both, for a rollback
    assert done.order_revision != current  # the revision moved again with our PUT
    assert [RecordedPut.from_dict(p).key for p in done.sync_puts] == [
        p["idempotency_key"] for p in puts
    ]


# --- 2. the rollback wins against a sync PUT still in flight ----------------------------


def test_2_a_sync_put_held_in_a_proxy_lands_after_the_rollback_as_a_replay(
    clean_database: Database, strict_fake: FakeMicroservice
) -> None:
    """No PUT of the same status is relied on: the rollback claims the sync's key with the
    sync's body first (the claim applies it), then puts the status back; the PUT the proxy
    held, landing last, is a replay of an applied key."""
    strict_fake.add_order(order("proxied", ("SKU-F", 2)))
    with HoldingProxy(strict_fake.url) as proxy:
        services = make_services(clean_database, strict_fake, url=proxy.url)
        operation_id = deducted_operation(services, strict_fake, "proxied")
        attempt = services.synchronization.execute(stages.SYNC_MICROSERVICE, operation_id)
        assert attempt.retry_in_s is not None and proxy.held.is_set()  # the client gave up
        services.cancellation.cancel_operation(operation_id, "operator", "while held")
        assert run(services, stages.ROLLBACK, the_rollback(services)) is StageOutcome.DONE
        assert fulfillment(strict_fake, "proxied") == "NEW"

        proxy.release()  # the held sync PUT reaches the wrapper now

    assert outcomes(strict_fake, "proxied") == ["applied", "applied", "replayed"]
    assert fulfillment(strict_fake, "proxied") == "NEW"
    assert row(services, operation_id).status == "cancelled" and stock(services, "SKU-F") == 5
    services.client.close()


def test_2_a_held_sync_puts_answer_during_a_pending_rollback_is_undone_by_that_rollback(
    clean_database: Database, strict_fake: FakeMicroservice
) -> None:
    """The sync PUT waits in the wrapper's queue; the cancel's rollback claims its key and
    meets it in flight, so it retries rather than reading the order. The held PUT then lands
    and its 204 reaches the sync, which finds the operation cancelled and a rollback pending:
    that rollback, on its next run, claims (a replay), reads PROCESSING and puts it back."""
    strict_fake.add_order(order("held-204", ("SKU-F", 2)), hold_puts=1)
    services = make_services(clean_database, strict_fake, timeout_s=30)  # it waits for the 204
    operation_id = deducted_operation(services, strict_fake, "held-204")
    with ThreadPoolExecutor(max_workers=1) as pool:
        sync = pool.submit(services.synchronization.execute, stages.SYNC_MICROSERVICE, operation_id)
        wait_until(lambda: strict_fake.held_puts("held-204") == 1)
        services.cancellation.cancel_operation(operation_id, "operator", "while in flight")
        rollback_id = the_rollback(services)
        waiting = services.synchronization.execute(stages.ROLLBACK, rollback_id)
        assert waiting.retry_in_s is not None  # its claim met the held PUT in flight
        assert outcomes(strict_fake, "held-204")[-1] == "in_flight"
        strict_fake.release_puts("held-204")
        assert sync.result(timeout=30).outcome is StageOutcome.STOPPED  # 204, but cancelled

    assert services.dispatcher.rollbacks == [rollback_id]  # type: ignore[attr-defined]
    assert fulfillment(strict_fake, "held-204") == "PROCESSING"
    assert run(services, stages.ROLLBACK, rollback_id) is StageOutcome.DONE
    assert fulfillment(strict_fake, "held-204") == "NEW"
    assert no_key_reused(strict_fake)
    services.client.close()


def wait_until(condition: Callable[[], bool], attempts: int = 3000) -> None:
    for _ in range(attempts):
        if condition():
            return
        threading.Event().wait(0.01)
    raise AssertionError("the condition never held")


# --- 3. the rollback's retries reuse no key with another body --------------------------


def test_3_a_rollback_retried_after_a_conflict_puts_back_under_a_new_key(
    services: Services, strict_fake: FakeMicroservice
) -> None:
    # reads: the load, then the rollback's; the buyer edits right after the rollback's read
    strict_fake.add_order(order("edited-later", ("SKU-F", 2)), edit_after_reads=2)
    operation_id = deducted_operation(services, strict_fake, "edited-later")
    assert run(services, stages.SYNC_MICROSERVICE, operation_id) is StageOutcome.DONE
    services.cancellation.cancel_operation(operation_id, "operator", "after completion")
    rollback_id = the_rollback(services)

    first = services.synchronization.execute(stages.ROLLBACK, rollback_id)
    assert first.retry_in_s is not None  # its put-back met the edit: 409, a retry
    assert run(services, stages.ROLLBACK, rollback_id) is StageOutcome.DONE

    backs = [p for p in puts_of(strict_fake, "edited-later") if p["status"] == "NEW"]
    assert [p["outcome"] for p in backs] == ["conflict", "applied"]
    assert backs[0]["idempotency_key"] != backs[1]["idempotency_key"]
    assert no_key_reused(strict_fake) and fulfillment(strict_fake, "edited-later") == "NEW"


# --- 4. the revision on the row only moves forward --------------------------------------


def test_4_an_older_reload_never_records_its_revision_over_a_newer_one(
    services: Services, strict_fake: FakeMicroservice
) -> None:
    strict_fake.add_order(order("two-reads", ("SKU-F", 2)))
    operation_id = deducted_operation(services, strict_fake, "two-reads")
    strict_fake.add_order(strict_fake.order("two-reads"), hold_get_answers=1)
    reload = services.synchronization._reload_for_sync
    with ThreadPoolExecutor(max_workers=1) as pool:
        older = pool.submit(reload, operation_id, None)  # reads, then waits to answer
        wait_until(lambda: strict_fake.held_get_answers("two-reads") == 1)
        strict_fake.buyer_edit("two-reads")
        newer = reload(operation_id, None)  # reads after the edit, records first
        newest_revision = strict_fake.order("two-reads")["revision"]
        strict_fake.release_get_answers("two-reads")
        older_request = older.result(timeout=30)

    recorded = row(services, operation_id)
    expected = revision_to_text(newest_revision)
    assert recorded.order_revision == expected and recorded.revision_reads == 2
    assert newer.revision == older_request.revision == newest_revision  # type: ignore[union-attr]
    assert recorded.sync_puts is not None
    assert recorded.sync_puts[-1]["key"] == sync_key(operation_id, expected)
    assert len(recorded.sync_puts) == 2  # the load's revision and the newest, never the older


# --- 5. a buyer's cancellation after the load -------------------------------------------


def test_5_a_buyer_cancellation_after_the_load_cancels_the_operation_and_sends_no_put(
    services: Services, strict_fake: FakeMicroservice
) -> None:
    strict_fake.add_order(order("buyer-cancels", ("SKU-F", 2)), cancel_after_reads=1)
    operation_id = deducted_operation(services, strict_fake, "buyer-cancels")
    assert stock(services, "SKU-F") == 3

    assert run(services, stages.SYNC_MICROSERVICE, operation_id) is StageOutcome.STOPPED

    cancelled = row(services, operation_id)
    assert (cancelled.status, cancelled.cancelled_by) == ("cancelled", "marketplace")
    assert stock(services, "SKU-F") == 5  # restored
    assert services.dispatcher.rollbacks == []  # type: ignore[attr-defined]
    assert outcomes(strict_fake, "buyer-cancels") == ["conflict"]  # the one PUT, refused
    assert fulfillment(strict_fake, "buyer-cancels") == "NEW"
    wait_for_outcome(strict_fake, "buyer-cancels", "conflict")

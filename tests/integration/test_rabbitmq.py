"""RabbitMQ as the broker (STOCK_SYNC_TEST_BROKER=rabbitmq, the last run of `make test-all`): the
queues the workers declare are durable quorum queues with a delivery limit, a countdown retry
waits in the broker (native delayed delivery) rather than in a worker, and a message handed
out past the limit is dropped: lost, which the stuck sweep exists for."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu import Connection

import celeryconfig
from stock_sync.domain.statuses import OperationStatus
from stock_sync.producer import submit_operation
from stock_sync_dev import rabbitmq
from tests.conftest import BROKER_URL, TEST_BROKER, run_queue_name
from tests.support import Pipeline, order

pytestmark = pytest.mark.skipif(
    TEST_BROKER != "rabbitmq", reason="runs with STOCK_SYNC_TEST_BROKER=rabbitmq (make test-all)"
)
S = OperationStatus
DELAY_LEVELS = 28  # kombu's native delayed delivery: queues celery_delayed_0 .. _27
WAIT_S = 60.0


@pytest.fixture
def broker() -> Iterator[Connection]:
    with Connection(BROKER_URL) as connection:
        connection.ensure_connection(max_retries=3)
        yield connection


def waiting_in(connection: Connection, queue: str) -> int:
    """Messages ready in ``queue`` (a passive declare: the queue must exist)."""
    return int(connection.default_channel.queue_declare(queue=queue, passive=True).message_count)


def delayed_messages(connection: Connection) -> int:
    return sum(waiting_in(connection, f"celery_delayed_{level}") for level in range(DELAY_LEVELS))


def test_the_workers_queues_are_durable_quorum_queues_with_a_delivery_limit(
    pipeline: Pipeline, pipeline_environment: str, rabbitmq_vhost: str
) -> None:
    declared = rabbitmq.queues(rabbitmq_vhost)
    for name in (pipeline_environment, f"{pipeline_environment}_maintenance"):
        queue = declared[name]
        assert (queue.type, queue.durable) == ("quorum", True), queue
        assert queue.arguments["x-delivery-limit"] == celeryconfig.QUORUM_DELIVERY_LIMIT
    # the worker declared the chain of delay queues of native delayed delivery, as quorum queues
    assert {declared[f"celery_delayed_{level}"].type for level in range(DELAY_LEVELS)} == {"quorum"}


def eta_timers(worker: Any) -> list[Any]:
    """What the worker holds to run later: the entries of its consumer's timer that apply an
    ETA task (where a countdown message waits on Redis)."""
    entries = list(worker.consumer.timer.queue)
    return [entry for entry in entries if "apply_eta_task" in repr(entry)]


def test_a_countdown_retry_waits_in_the_broker_not_in_the_worker(
    pipeline: Pipeline,
    retry_limits: Callable[..., None],
    celery_session_worker: Any,
    broker: Connection,
    pipeline_environment: str,
) -> None:
    # A backoff of 3 to 6 s: long enough to catch the message on its way round.
    retry_limits(retry_backoff_base_s=6, retry_backoff_max_s=6)
    pipeline.set_stock(**{"SKU-R": 1})
    pipeline.fake.add_order(order("paid-later", ("SKU-R", 1)), ready_after_reads=1)
    assert delayed_messages(broker) == 0

    operation_id = submit_operation("paid-later")
    deadline = time.monotonic() + WAIT_S
    while delayed_messages(broker) == 0:  # the retry was published to the delay queues
        assert time.monotonic() < deadline, "the retry never reached a celery_delayed_* queue"
        assert pipeline.operation(operation_id).status == S.PENDING.value
        time.sleep(0.02)
    held = eta_timers(celery_session_worker)
    waiting = waiting_in(broker, pipeline_environment)

    (done,) = pipeline.wait_for([operation_id])
    assert done.status == S.COMPLETED.value
    assert pipeline.actions(operation_id).count("retry_scheduled") == 1
    assert held == [] and waiting == 0  # nothing of it in the worker or in the pipeline queue
    assert delayed_messages(broker) == 0  # it came back out of the delay queues


def next_delivery(queue: Any, wait_s: float = 2.0) -> Any:
    """The queue's next message, or None when none shows up within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while (message := queue.get(no_ack=False)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return message


def test_a_message_returned_past_the_delivery_limit_is_dropped() -> None:
    """What the sweep is for: a message whose workers keep dying (each death returns it to the
    queue) is dropped by RabbitMQ after the limit instead of killing workers forever."""
    with Connection(BROKER_URL, transport_options={"confirm_publish": True}) as connection:
        queue = celeryconfig.quorum_queue(run_queue_name("delivery-limit"))
        bound = queue(connection.default_channel)
        bound.declare()
        try:
            connection.Producer().publish(  # confirmed: in the queue once this returns
                {"operation": str(uuid.uuid4())},
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                delivery_mode=2,
            )
            deliveries = 0
            while (message := next_delivery(bound)) is not None:
                deliveries += 1
                assert deliveries <= 100, "the delivery limit never dropped the message"
                message.requeue()  # as a worker that dies holding it
            assert deliveries == celeryconfig.QUORUM_DELIVERY_LIMIT + 1
            assert waiting_in(connection, queue.name) == 0
        finally:
            bound.delete()

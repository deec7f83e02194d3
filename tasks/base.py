"""The shared base of the stage tasks: bind the operation, call the service, map the result."""

from __future__ import annotations

import logging
import math
import uuid
from typing import Any

from celery import Task
from celery.utils.quorum_queues import detect_quorum_queues

from stock_sync.adapters.logging_setup import operation_log_context
from stock_sync.adapters.telemetry import annotate_stage_span
from stock_sync.composition import get_services
from stock_sync.domain.stages import Stage
from stock_sync.services.standardized_logger import measure_execution_time

logger = logging.getLogger("stock_sync.tasks")


class OperationTask(Task):  # type: ignore[misc]
    """JSON-logging base task: every record a stage writes carries its operation context.

    The retry budget lives in the operation row, not in the message, so Celery's own
    ``max_retries`` is off: a re-enqueued operation never gets a fresh budget.
    """

    abstract = True
    max_retries = None
    acks_late = True
    ignore_result = True

    def run_stage(self, stage: Stage, operation_id: str, generation: int | None = None) -> str:
        """Run ``stage`` for ``operation_id``; returns the id for the next link.

        ``generation``: the dispatch this message belongs to (every link of a chain carries
        it; None in a message published before dispatches were counted)."""
        with operation_log_context(operation_id=operation_id, stage=stage.name):
            annotate_stage_span(operation_id=operation_id, stage=stage.name)
            try:
                parsed = uuid.UUID(str(operation_id))
            except ValueError:
                logger.error("malformed operation id %r: message dropped", operation_id)
                self.request.chain = None
                return operation_id
            with measure_execution_time() as timer:
                result = get_services().synchronization.execute(
                    stage, parsed, _generation(generation)
                )
            logger.debug(
                "stage %s finished: %s",
                stage.name,
                result.outcome.value,
                extra={"execution_time_ms": timer.elapsed_ms},
            )
        if result.retry_in_s is not None:
            raise self.retry(
                countdown=broker_countdown(self.app, result.retry_in_s), max_retries=None
            )
        if not result.continues_chain:
            self.request.chain = None  # cancelled, failed or gave up: stop the chain quietly
        return operation_id


def _generation(value: object) -> int | None:
    """The message's dispatch generation, or None when it carries none (or a malformed one:
    such a message is treated as one of the current dispatch)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def broker_countdown(app: Any, seconds: float) -> float:
    """The countdown to publish for a wait of ``seconds``.

    RabbitMQ's native delayed delivery (used by Celery as soon as a declared queue is a quorum
    queue) counts whole seconds: Celery truncates the countdown, and refuses one under a second
    outright. Rounded up, a retry never runs before the time its operation row records.
    """
    driver = app.producer_pool.connections.connection.transport.driver_type
    if detect_quorum_queues(app, driver)[0]:
        return float(max(1, math.ceil(seconds)))
    return seconds

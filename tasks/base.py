"""The shared base of the stage tasks: bind the operation, call the service, map the result."""

from __future__ import annotations

import logging
import uuid

from celery import Task

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

    def run_stage(self, stage: Stage, operation_id: str) -> str:
        """Run ``stage`` for ``operation_id``; returns the id for the next link."""
        with operation_log_context(operation_id=operation_id, stage=stage.name):
            annotate_stage_span(operation_id=operation_id, stage=stage.name)
            try:
                parsed = uuid.UUID(str(operation_id))
            except ValueError:
                logger.error("malformed operation id %r: message dropped", operation_id)
                self.request.chain = None
                return operation_id
            with measure_execution_time() as timer:
                result = get_services().synchronization.execute(stage, parsed)
            logger.debug(
                "stage %s finished: %s",
                stage.name,
                result.outcome.value,
                extra={"execution_time_ms": timer.elapsed_ms},
            )
        if result.retry_in_s is not None:
            raise self.retry(countdown=result.retry_in_s, max_retries=None)
        if not result.continues_chain:
            self.request.chain = None  # cancelled, failed or gave up: stop the chain quietly
        return operation_id

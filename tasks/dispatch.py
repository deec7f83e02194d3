"""The Celery implementation of the services' Dispatcher port."""

from __future__ import annotations

import uuid

from stock_sync.domain.statuses import OperationStatus
from tasks.stages import pipeline_for, rollback


class CeleryDispatcher:
    """Enqueues chains and rollbacks on the configured broker."""

    def enqueue_pipeline(self, operation_id: uuid.UUID, status: OperationStatus) -> None:
        pipeline_for(str(operation_id), status).apply_async()

    def enqueue_rollback(self, adjustment_operation_id: uuid.UUID) -> None:
        rollback.apply_async((str(adjustment_operation_id),))

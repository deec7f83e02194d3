"""The Dispatcher port: how the services put work on the broker.

The Celery implementation lives in ``tasks/dispatch.py``; the Celery app passes it to the
composition root, so nothing here knows Celery.
"""

from __future__ import annotations

import uuid
from typing import Protocol

from stock_sync.domain.statuses import OperationStatus


class Dispatcher(Protocol):
    """Enqueues the pipeline from a status, and microservice rollbacks."""

    def enqueue_pipeline(self, operation_id: uuid.UUID, status: OperationStatus) -> None: ...

    def enqueue_rollback(self, adjustment_operation_id: uuid.UUID) -> None: ...

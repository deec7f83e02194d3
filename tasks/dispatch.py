"""The Celery implementation of the services' Dispatcher port."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

from stock_sync.adapters.settings import get_settings, prepare_broker_folders
from stock_sync.domain.statuses import OperationStatus
from tasks.app import app
from tasks.stages import queue_probe_task, rollback, send_pipeline


class CeleryDispatcher:
    """Enqueues chains, rollbacks and queue probes on the configured broker (the probes on the
    pipeline queue, behind whatever waits in it)."""

    def __init__(self) -> None:
        # A producer on the filesystem transport writes into its folder: made ready here.
        prepare_broker_folders(get_settings())

    def enqueue_pipeline(
        self, operation_id: uuid.UUID, status: OperationStatus, generation: int
    ) -> None:
        send_pipeline(str(operation_id), status, generation)

    def enqueue_pipelines(
        self,
        dispatches: Sequence[tuple[uuid.UUID, OperationStatus, int]],
        on_published: Callable[[int], None] | None = None,
    ) -> None:
        # One pooled connection for every message; with confirm_publish (RabbitMQ) each
        # publish still waits for the broker's confirm.
        with app.pool.acquire(block=True) as connection:
            for published, (operation_id, status, generation) in enumerate(dispatches, start=1):
                send_pipeline(str(operation_id), status, generation, connection=connection)
                if on_published is not None:
                    on_published(published)

    def enqueue_rollback(self, adjustment_operation_id: uuid.UUID, generation: int) -> None:
        rollback.apply_async((str(adjustment_operation_id),), {"generation": generation})

    def enqueue_probe(self, probe_id: int) -> None:
        queue_probe_task.apply_async((probe_id,))

"""The Dispatcher port: how the services put work on the broker.

The Celery implementation lives in ``tasks/dispatch.py``; the Celery app passes it to the
composition root, so nothing here knows Celery.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

from stock_sync.domain.statuses import OperationStatus


class Dispatcher(Protocol):
    """Enqueues the pipeline from a status, microservice rollbacks and queue probes.

    ``generation`` is the operation's ``dispatch_generation`` that the caller committed before
    enqueueing: every message of the dispatch carries it, and a stage drops a copy of an older
    one (see stock_sync.services.stuck)."""

    def enqueue_pipeline(
        self, operation_id: uuid.UUID, status: OperationStatus, generation: int
    ) -> None: ...

    def enqueue_pipelines(
        self,
        dispatches: Sequence[tuple[uuid.UUID, OperationStatus, int]],
        on_published: Callable[[int], None] | None = None,
    ) -> None:
        """Each (operation, status, generation)'s pipeline, in order, over one broker
        connection; raises at the first one that could not be published, after
        ``on_published(n)`` was called for each of the first n that were."""
        ...

    def enqueue_rollback(self, adjustment_operation_id: uuid.UUID, generation: int) -> None: ...

    def enqueue_probe(self, probe_id: int) -> None: ...

"""One thin task per stage; ``send_pipeline`` chains them (Celery's chain, as its canvas
publishes it)."""

from __future__ import annotations

from typing import Any

from stock_sync.composition import get_services
from stock_sync.domain import stages
from stock_sync.domain.statuses import OperationStatus
from stock_sync.services.sweeps import record_probe_consumed
from tasks.app import app
from tasks.base import OperationTask


@app.task(bind=True, base=OperationTask, name="stock_sync.load_line_items")
def load_line_items(self: OperationTask, operation_id: str, generation: int | None = None) -> str:
    return self.run_stage(stages.LOAD_LINE_ITEMS, operation_id, generation)


@app.task(bind=True, base=OperationTask, name="stock_sync.validate_stock")
def validate_stock(self: OperationTask, operation_id: str, generation: int | None = None) -> str:
    return self.run_stage(stages.VALIDATE_STOCK, operation_id, generation)


@app.task(bind=True, base=OperationTask, name="stock_sync.deduct_stock")
def deduct_stock(self: OperationTask, operation_id: str, generation: int | None = None) -> str:
    return self.run_stage(stages.DEDUCT_STOCK, operation_id, generation)


@app.task(bind=True, base=OperationTask, name="stock_sync.sync_microservice")
def sync_microservice(self: OperationTask, operation_id: str, generation: int | None = None) -> str:
    return self.run_stage(stages.SYNC_MICROSERVICE, operation_id, generation)


@app.task(bind=True, base=OperationTask, name="stock_sync.rollback")
def rollback(
    self: OperationTask, adjustment_operation_id: str, generation: int | None = None
) -> str:
    """Put the microservice back to the status recorded before the sync."""
    return self.run_stage(stages.ROLLBACK, adjustment_operation_id, generation)


TASKS_BY_STAGE = {
    stages.LOAD_LINE_ITEMS.name: load_line_items,
    stages.VALIDATE_STOCK.name: validate_stock,
    stages.DEDUCT_STOCK.name: deduct_stock,
    stages.SYNC_MICROSERVICE.name: sync_microservice,
}


def send_pipeline(
    operation_id: str, status: OperationStatus, generation: int, **options: Any
) -> None:
    """Publish the chain of the stages still to run for an operation in ``status``, every link
    of dispatch ``generation``: the first stage's message carrying the others as its chain,
    exactly what ``chain(...).apply_async()`` publishes (the worker pops the next link from
    the end of the list), without building and freezing a canvas for every order (half of a
    submit's CPU in the producer's profile)."""
    remaining = [TASKS_BY_STAGE[stage.name] for stage in stages.remaining_pipeline(status)]
    if not remaining:
        raise ValueError(f"nothing to run for an operation in status {status.value}")
    first, *rest = remaining
    links = [_link(task.name, generation) for task in reversed(rest)]
    first.apply_async((operation_id,), {"generation": generation}, chain=links or None, **options)


def _link(task_name: str, generation: int) -> dict[str, Any]:
    """A chain link as a signature's dict: the previous stage's return value (the operation
    id) becomes its argument."""
    return {
        "task": task_name,
        "args": [],
        "kwargs": {"generation": generation},
        "options": {},
        "subtask_type": None,
        "immutable": False,
        "chord_size": None,
    }


@app.task(name="stock_sync.queue_probe", ignore_result=True, acks_late=True)
def queue_probe_task(probe_id: int) -> None:
    """Record that a worker took this probe from the pipeline queue (see services.stuck)."""
    record_probe_consumed(get_services().database, probe_id)

"""One thin task per stage; ``pipeline_for`` chains them with canvas."""

from __future__ import annotations

from celery import chain
from celery.canvas import Signature

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


def pipeline_for(operation_id: str, status: OperationStatus, generation: int) -> Signature:
    """The chain of the stages still to run for an operation in ``status``, every link of
    dispatch ``generation``."""
    remaining = [TASKS_BY_STAGE[stage.name] for stage in stages.remaining_pipeline(status)]
    if not remaining:
        raise ValueError(f"nothing to run for an operation in status {status.value}")
    first, *rest = remaining
    return chain(
        first.s(operation_id, generation=generation),
        *(task.s(generation=generation) for task in rest),
    )


@app.task(name="stock_sync.queue_probe", ignore_result=True, acks_late=True)
def queue_probe_task(probe_id: int) -> None:
    """Record that a worker took this probe from the pipeline queue (see services.stuck)."""
    record_probe_consumed(get_services().database, probe_id)

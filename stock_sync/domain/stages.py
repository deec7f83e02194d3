"""The pipeline's stages as data: which status each works on and how it reports failure."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.statuses import FINAL_STATUSES, OperationStatus

S = OperationStatus


class RetryCounter(str, Enum):
    """Where a stage's used retries are counted on the operation row.

    Every stage has its own budget. The stages of one status share the row's ``retry_count``
    (it restarts at each transition), except deduct_stock, which shares PROCESSING with
    validate_stock and so counts in a column of its own.
    """

    STATUS = "retry_count"
    DEDUCTION = "deduction_retry_count"


@dataclass(frozen=True)
class Stage:
    """One Celery task of the chain: it acts on operations in ``status``."""

    name: str
    status: OperationStatus
    failure_action: LogAction
    retry_budget: str  # the settings key of this stage's retry limit
    retry_counter: RetryCounter = RetryCounter.STATUS


LOAD_LINE_ITEMS = Stage(
    "load_line_items", S.PENDING, LogAction.LINE_ITEMS_LOAD_FAILED, retry_budget="pending"
)
VALIDATE_STOCK = Stage(
    "validate_stock", S.PROCESSING, LogAction.STOCK_VALIDATION_FAILED, retry_budget="processing"
)
DEDUCT_STOCK = Stage(
    "deduct_stock",
    S.PROCESSING,
    LogAction.STOCK_DEDUCTION_FAILED,
    retry_budget="deduction",
    retry_counter=RetryCounter.DEDUCTION,
)
SYNC_MICROSERVICE = Stage(
    "sync_microservice",
    S.STOCK_DEDUCTED,
    LogAction.MICROSERVICE_SYNC_FAILED,
    retry_budget="stock_deducted",
)
ROLLBACK = Stage("rollback", S.PENDING, LogAction.MICROSERVICE_SYNC_FAILED, retry_budget="rollback")

PIPELINE: tuple[Stage, ...] = (LOAD_LINE_ITEMS, VALIDATE_STOCK, DEDUCT_STOCK, SYNC_MICROSERVICE)
STAGES_BY_NAME = {stage.name: stage for stage in (*PIPELINE, ROLLBACK)}

# How far along the happy path a status is; a stage skips operations already past it.
_PROGRESS = {S.PENDING: 0, S.PROCESSING: 1, S.STOCK_DEDUCTED: 2, S.COMPLETED: 3}


class StageOutcome(str, Enum):
    """What a stage found and did; the task continues the chain unless STOPPED."""

    DONE = "done"
    ALREADY_PAST = "already_past"
    STOPPED = "stopped"

    @property
    def continues_chain(self) -> bool:
        return self is not StageOutcome.STOPPED


def stage_outcome_for(status: OperationStatus, stage: Stage) -> StageOutcome | None:
    """None when the stage should run (the operation is in its status); otherwise why not.

    Past the stage (a duplicate delivery): ALREADY_PAST, the chain goes on. Final, or not yet
    at the stage (a chain running ahead of its operation): STOPPED; whatever drives the
    operation to this stage (its own chain, or the sweep) will run it then.
    """
    if status is stage.status:
        return None
    if status not in FINAL_STATUSES and _PROGRESS[status] > _PROGRESS[stage.status]:
        return StageOutcome.ALREADY_PAST
    return StageOutcome.STOPPED


def remaining_pipeline(status: OperationStatus) -> tuple[Stage, ...]:
    """The stages still to run for an operation in ``status`` (for re-driving it)."""
    if status in FINAL_STATUSES or status is S.COMPLETED:
        return ()
    return tuple(stage for stage in PIPELINE if _PROGRESS[stage.status] >= _PROGRESS[status])

"""The lifecycle table against the seed's diagram, checked pair by pair."""

from __future__ import annotations

import itertools

import pytest

from stock_sync.domain import stages
from stock_sync.domain.errors import InvalidTransition
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.stages import StageOutcome
from stock_sync.domain.statuses import (
    CANCELLABLE_STATUSES,
    FINAL_STATUSES,
    TERMINAL_STATUSES,
    OperationStatus,
    OperationType,
    can_transition,
    ensure_transition,
    reachable_from,
)

S = OperationStatus

# Written out again from the seed's mermaid diagram, independently of the table under test.
SEED_DIAGRAM_EDGES = {
    (S.PENDING, S.PROCESSING),
    (S.PROCESSING, S.STOCK_DEDUCTED),
    (S.STOCK_DEDUCTED, S.COMPLETED),
    (S.PENDING, S.CANCELLED),
    (S.PROCESSING, S.CANCELLED),
    (S.STOCK_DEDUCTED, S.CANCELLED),
    (S.COMPLETED, S.CANCELLED),
    (S.PENDING, S.FAILED),
    (S.PROCESSING, S.FAILED),
    (S.STOCK_DEDUCTED, S.FAILED),
}


def test_status_values_are_exactly_the_seeds() -> None:
    assert {s.name: s.value for s in OperationStatus} == {
        "PENDING": "pending",
        "PROCESSING": "processing",
        "STOCK_DEDUCTED": "stock_deducted",
        "COMPLETED": "completed",
        "FAILED": "failed",
        "CANCELLED": "cancelled",
    }


@pytest.mark.parametrize(("from_status", "to_status"), list(itertools.product(S, S)))
def test_every_pair_matches_the_seed_diagram(from_status: S, to_status: S) -> None:
    assert can_transition(from_status, to_status) == (
        (from_status, to_status) in SEED_DIAGRAM_EDGES
    )


@pytest.mark.parametrize("final", [S.FAILED, S.CANCELLED])
def test_failed_and_cancelled_have_no_exits(final: S) -> None:
    assert final in FINAL_STATUSES
    assert not any(can_transition(final, target) for target in S)


def test_completed_only_exits_to_cancelled() -> None:
    assert [t for t in S if can_transition(S.COMPLETED, t)] == [S.CANCELLED]


@pytest.mark.parametrize("operation_type", list(OperationType))
@pytest.mark.parametrize("status", [S.PENDING, S.PROCESSING, S.STOCK_DEDUCTED])
def test_every_live_status_can_reach_a_terminal_one(
    status: S, operation_type: OperationType
) -> None:
    if operation_type is not OperationType.ORDER_DEDUCTION and status is not S.PENDING:
        return  # adjustments only live in PENDING
    assert reachable_from(status, operation_type) & TERMINAL_STATUSES


def test_an_invalid_transition_raises_a_dedicated_error() -> None:
    with pytest.raises(InvalidTransition) as raised:
        ensure_transition(S.FAILED, S.PROCESSING)
    assert (raised.value.from_status, raised.value.to_status) == ("failed", "processing")
    assert "failed -> processing" in str(raised.value)


def test_a_valid_transition_passes() -> None:
    ensure_transition(S.PENDING, S.PROCESSING)


def test_adjustments_only_succeed_or_fail() -> None:
    assert can_transition(S.PENDING, S.COMPLETED, OperationType.STOCK_RESTORATION)
    assert can_transition(S.PENDING, S.FAILED, OperationType.MICROSERVICE_ROLLBACK)
    assert not can_transition(S.PENDING, S.PROCESSING, OperationType.MICROSERVICE_ROLLBACK)
    assert not can_transition(S.PENDING, S.COMPLETED)  # an order must go through its stages


def test_cancellable_statuses_follow_the_table() -> None:
    assert {S.PENDING, S.PROCESSING, S.STOCK_DEDUCTED, S.COMPLETED} == CANCELLABLE_STATUSES


def test_log_actions_are_the_seeds_then_the_one_recovery_added() -> None:
    """The seed's vocabulary in its order, then OPERATION_RETRIED (the issue "Time is not a
    fault" asks a retry of a FAILED operation to be logged as an action of its own)."""
    expected = [
        "operation_created", "account_name_updated",
        "line_items_loading", "line_items_loaded", "line_items_load_failed",
        "stock_validation_started", "stock_validation_passed", "stock_validation_failed",
        "stock_deduction_started", "stock_deduction_completed", "stock_deduction_failed",
        "microservice_sync_started", "microservice_sync_success", "microservice_sync_failed",
        "status_transition",
        "cancellation_requested", "stock_rollback_started", "stock_rollback_completed",
        "microservice_rollback_started", "microservice_rollback_completed",
        "cancellation_completed",
        "retry_scheduled", "max_retries_reached", "operation_failed",
        "operation_retried",
    ]  # fmt: skip
    assert [action.value for action in LogAction] == expected
    assert all(action.name == action.value.upper() for action in LogAction)


@pytest.mark.parametrize(
    ("status", "stage", "expected"),
    [
        (S.PENDING, stages.LOAD_LINE_ITEMS, None),
        (S.PROCESSING, stages.LOAD_LINE_ITEMS, StageOutcome.ALREADY_PAST),
        (S.COMPLETED, stages.DEDUCT_STOCK, StageOutcome.ALREADY_PAST),
        (S.PROCESSING, stages.VALIDATE_STOCK, None),
        (S.PROCESSING, stages.DEDUCT_STOCK, None),
        (S.PENDING, stages.DEDUCT_STOCK, StageOutcome.STOPPED),  # not there yet
        (S.PROCESSING, stages.SYNC_MICROSERVICE, StageOutcome.STOPPED),
        (S.CANCELLED, stages.LOAD_LINE_ITEMS, StageOutcome.STOPPED),
        (S.FAILED, stages.SYNC_MICROSERVICE, StageOutcome.STOPPED),
    ],
)
def test_a_stage_runs_only_on_its_own_status(
    status: S, stage: stages.Stage, expected: StageOutcome | None
) -> None:
    assert stages.stage_outcome_for(status, stage) == expected


def test_a_redriven_operation_resumes_at_its_own_stage() -> None:
    assert [s.name for s in stages.remaining_pipeline(S.PROCESSING)] == [
        "validate_stock",
        "deduct_stock",
        "sync_microservice",
    ]
    assert stages.remaining_pipeline(S.COMPLETED) == ()

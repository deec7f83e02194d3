"""The fault suite's judgement of a FAILED operation: the budget it spent is the one of the stage
whose retry limit failed it."""

from __future__ import annotations

import uuid

from stock_sync_dev.chaos_checks import OperationRow, spent_budget


def _failed(
    *, failed_stage: str | None, retry_count: int, deduction_retry_count: int
) -> OperationRow:
    return OperationRow(
        id=uuid.uuid4(),
        order_id="order-1",
        account_name="shop",
        operation_type="order_deduction",
        status="failed",
        parent_id=None,
        line_items=(("sku-1", 2),),
        retry_count=retry_count,
        deduction_retry_count=deduction_retry_count,
        failed_stage=failed_stage,
        last_error_type="InsufficientStock",
        last_error="insufficient stock",
        has_deductions=False,
    )


def test_a_validation_that_failed_after_short_deductions_spent_the_processing_budget() -> None:
    row = _failed(failed_stage="validate_stock", retry_count=16, deduction_retry_count=12)
    assert spent_budget(row, "processing") == ("processing", 16)


def test_a_deduction_that_failed_spent_the_deduction_budget() -> None:
    row = _failed(failed_stage="deduct_stock", retry_count=3, deduction_retry_count=18)
    assert spent_budget(row, "processing") == ("deduction", 18)


def test_rows_from_before_the_failed_stage_column_fall_back_to_the_deduction_count() -> None:
    row = _failed(failed_stage=None, retry_count=3, deduction_retry_count=18)
    assert spent_budget(row, "processing") == ("deduction", 18)

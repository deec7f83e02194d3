"""The seed's logging vocabulary: every operation log record names one of these actions."""

from __future__ import annotations

from enum import Enum


class LogAction(str, Enum):
    """Standardised actions, exactly as the seed design lists them."""

    # creation and initialisation
    OPERATION_CREATED = "operation_created"
    ACCOUNT_NAME_UPDATED = "account_name_updated"

    # loading the order's line items
    LINE_ITEMS_LOADING = "line_items_loading"
    LINE_ITEMS_LOADED = "line_items_loaded"
    LINE_ITEMS_LOAD_FAILED = "line_items_load_failed"

    # stock validation
    STOCK_VALIDATION_STARTED = "stock_validation_started"
    STOCK_VALIDATION_PASSED = "stock_validation_passed"
    STOCK_VALIDATION_FAILED = "stock_validation_failed"

    # stock deduction
    STOCK_DEDUCTION_STARTED = "stock_deduction_started"
    STOCK_DEDUCTION_COMPLETED = "stock_deduction_completed"
    STOCK_DEDUCTION_FAILED = "stock_deduction_failed"

    # microservice synchronisation
    MICROSERVICE_SYNC_STARTED = "microservice_sync_started"
    MICROSERVICE_SYNC_SUCCESS = "microservice_sync_success"
    MICROSERVICE_SYNC_FAILED = "microservice_sync_failed"

    # status transitions
    STATUS_TRANSITION = "status_transition"

    # cancellation
    CANCELLATION_REQUESTED = "cancellation_requested"
    STOCK_ROLLBACK_STARTED = "stock_rollback_started"
    STOCK_ROLLBACK_COMPLETED = "stock_rollback_completed"
    MICROSERVICE_ROLLBACK_STARTED = "microservice_rollback_started"
    MICROSERVICE_ROLLBACK_COMPLETED = "microservice_rollback_completed"
    CANCELLATION_COMPLETED = "cancellation_completed"

    # error handling
    RETRY_SCHEDULED = "retry_scheduled"
    MAX_RETRIES_REACHED = "max_retries_reached"
    OPERATION_FAILED = "operation_failed"

    # recovery (not in the seed: `stock-sync retry` gives a FAILED operation a successor)
    OPERATION_RETRIED = "operation_retried"

"""The producer API the shop backend calls: submit an order's operation, request a cancel.

The operation row is committed before anything is enqueued (the broker is only a trigger): if
enqueueing fails the row stays PENDING and the stuck-operation sweep re-drives it.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select
from sqlalchemy.exc import IntegrityError

from stock_sync.adapters.models import (
    ACCOUNT_NAME_MAX_LENGTH,
    OPERATIONS_TABLE,
    ORDER_ID_MAX_LENGTH,
    db_now,
    utcnow,
)
from stock_sync.adapters.telemetry import traced_submit
from stock_sync.composition import Services, get_services
from stock_sync.domain.errors import EnqueueFailed, InvalidInput
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.domain.text import checked_text
from stock_sync.services.operation_cancellation_service import CancellationResult
from stock_sync.services.operations import FIRST_DISPATCH, operation_logger
from stock_sync.services.recovery import RetryResult


def _checked_order_id(order_id: object) -> str:
    return checked_text("order_id", order_id, max_length=ORDER_ID_MAX_LENGTH, allow_spaces=False)


def _checked_account_name(account_name: object) -> str | None:
    if account_name is None:
        return None
    return checked_text("account_name", account_name, max_length=ACCOUNT_NAME_MAX_LENGTH)


_operations = OPERATIONS_TABLE.c
# Built once: the shop backend calls this for every order.
# The order's live deduction: the submitted one, or the last retry of it (see retry_operation).
_FIND_DEDUCTION = select(_operations.id, _operations.account_name).where(
    _operations.order_id == bindparam("find_order_id"),
    _operations.operation_type == OperationType.ORDER_DEDUCTION.value,
    _operations.successor_operation_id.is_(None),
)
# Published right after the commit: its first dispatch, stamped by the database's clock.
_INSERT_OPERATION = insert(OPERATIONS_TABLE).values(dispatched_at=db_now())


def _existing(connection: Connection, order_id: str, account_name: str | None) -> uuid.UUID | None:
    """The order's deduction, if any (one per order, whatever the account; after a retry, the
    successor).

    An operation recorded without an account matches any account; one recorded for another
    account is a contradiction (an Allegro order belongs to one account): InvalidInput.
    """
    found = connection.execute(_FIND_DEDUCTION, {"find_order_id": order_id}).first()
    if found is None:
        return None
    operation_id, recorded_account = found
    if account_name is not None and recorded_account not in (None, account_name):
        raise InvalidInput(
            f"account_name: order {order_id} already has operation {operation_id} "
            f"for account {recorded_account!r}, not {account_name!r}"
        )
    return uuid.UUID(str(operation_id))


def default_services() -> Services:
    """This process's services, with the Celery app's dispatcher plugged in."""
    import tasks  # noqa: F401  (importing the Celery app passes its dispatcher in)

    return get_services()


def _create(services: Services, order_id: str, account_name: str | None) -> tuple[uuid.UUID, bool]:
    with services.database.core_transaction() as connection:
        existing = _existing(connection, order_id, account_name)
        if existing is not None:
            return existing, False
        now = utcnow()
        created = NewOperation(
            id=uuid.uuid4(),
            order_id=order_id,
            account_name=account_name,
            operation_type=OperationType.ORDER_DEDUCTION.value,
            status=OperationStatus.PENDING.value,
            retry_count=0,
            deduction_retry_count=0,
            line_items=None,
            created_at=now,
            updated_at=now,
            dispatch_generation=FIRST_DISPATCH,
        )
        connection.execute(_INSERT_OPERATION, asdict(created))
        operation_logger(connection, created, services.logger).log_action_with_timing(
            created.id, LogAction.OPERATION_CREATED, f"operation created for order {order_id}"
        )
        return created.id, True


@dataclass
class NewOperation:
    """The row a submit inserts (every other column starts empty)."""

    id: uuid.UUID
    order_id: str
    account_name: str | None
    operation_type: str
    status: str
    retry_count: int
    deduction_retry_count: int
    line_items: list[dict[str, Any]] | None
    created_at: datetime
    updated_at: datetime
    dispatch_generation: int


@traced_submit  # the root span of the operation's trace (when tracing is on)
def submit_operation(
    order_id: str, account_name: str | None = None, *, services: Services | None = None
) -> uuid.UUID:
    """Record the order's stock operation (PENDING) and enqueue its pipeline.

    Submitting the same order again (also concurrently, with or without an account) returns
    the same id and enqueues nothing: one order deduction per order. Raises
    InvalidInput for a malformed argument (nothing written) and EnqueueFailed (carrying the
    saved operation's id) when the broker could not take the message.
    """
    order_id = _checked_order_id(order_id)
    account_name = _checked_account_name(account_name)
    services = services or default_services()
    try:
        operation_id, created = _create(services, order_id, account_name)
    except IntegrityError:
        # A concurrent submit of the same order won the unique index: return its operation.
        with services.database.core_transaction() as connection:
            found = _existing(connection, order_id, account_name)
        if found is None:
            raise
        return found
    if created:
        try:
            services.dispatcher.enqueue_pipeline(
                operation_id, OperationStatus.PENDING, FIRST_DISPATCH
            )
        except Exception as error:
            raise EnqueueFailed(operation_id, f"{type(error).__name__}: {error}") from error
    return operation_id


def request_cancellation(
    operation_id: uuid.UUID | str,
    cancelled_by: str,
    reason: str,
    *,
    services: Services | None = None,
) -> CancellationResult:
    """Cancel an operation now (stock restored in the same transaction); the microservice
    rollback, when one is needed, runs as a task (its state is in the result)."""
    services = services or default_services()
    return services.cancellation.cancel_operation(
        parse_operation_id(operation_id), cancelled_by, reason
    )


def retry_operation(
    operation_id: uuid.UUID | str, *, services: Services | None = None
) -> RetryResult:
    """Give a FAILED order deduction a successor that starts where it stopped (see
    :mod:`stock_sync.services.recovery`) and enqueue it; ``submit_operation`` of that order
    returns the successor from then on. Raises OperationNotFound for an unknown id and
    RetryRefused when the operation is not a FAILED order deduction or was retried already
    (nothing written either way)."""
    services = services or default_services()
    return services.recovery.retry_operation(parse_operation_id(operation_id))


def parse_operation_id(value: object) -> uuid.UUID:
    """An operation id from a UUID or its text, or InvalidInput naming the argument."""
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str):
        raise InvalidInput(f"operation_id must be a UUID, got {type(value).__name__}")
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        shown = ascii(value[:40]) + ("..." if len(value) > 40 else "")
        raise InvalidInput(f"operation_id: not an operation id (a UUID): {shown}") from None

"""The producer API the shop backend calls: submit an order's operation (one, or a batch for
imports and catch-ups), request a cancel.

The operation row is committed before anything is enqueued (the broker is only a trigger): if
enqueueing fails the row stays PENDING and the stuck-operation sweep re-drives it.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from stock_sync.adapters.models import (
    ACCOUNT_NAME_MAX_LENGTH,
    FIRST_ORDER_DEDUCTION,
    OPERATIONS_TABLE,
    ORDER_ID_MAX_LENGTH,
    db_now,
    utcnow,
)
from stock_sync.adapters.telemetry import traced_submit
from stock_sync.composition import Services, get_services
from stock_sync.domain.errors import BatchEnqueueFailed, EnqueueFailed, InvalidInput
from stock_sync.domain.log_actions import LogAction
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.domain.text import checked_text
from stock_sync.services.cancellation_results import CancellationResult
from stock_sync.services.operations import FIRST_DISPATCH, new_order_deduction, operation_logger
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
# The same question for many orders at once (a batch), asked this many orders at a time.
_FIND_DEDUCTIONS = select(_operations.order_id, _operations.id, _operations.account_name).where(
    _operations.order_id.in_(bindparam("find_order_ids", expanding=True)),
    _operations.operation_type == OperationType.ORDER_DEDUCTION.value,
    _operations.successor_operation_id.is_(None),
)
_LOOKUP_CHUNK = 1000
# Published right after the commit: its first dispatch, stamped by the database's clock.
_INSERT_OPERATION = insert(OPERATIONS_TABLE).values(dispatched_at=db_now())
# A batch that lost a race with a concurrent submit of one of its orders runs again (it then
# finds that order's operation); this many times at most.
_BATCH_ATTEMPTS = 3


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
    _check_account(order_id, operation_id, recorded_account, account_name)
    return uuid.UUID(str(operation_id))


def _check_account(
    order_id: str, operation_id: object, recorded: str | None, asked: str | None
) -> None:
    if asked is not None and recorded not in (None, asked):
        raise InvalidInput(
            f"account_name: order {order_id} already has operation {operation_id} "
            f"for account {recorded!r}, not {asked!r}"
        )


def default_services() -> Services:
    """This process's services, with the Celery app's dispatcher plugged in."""
    import tasks  # noqa: F401  (importing the Celery app passes its dispatcher in)

    return get_services()


def _create(services: Services, order_id: str, account_name: str | None) -> tuple[uuid.UUID, bool]:
    """Insert the order's operation unless the order has one: one statement for a new order
    (its unique index answers the question), a look-up only when it was there already."""
    with services.database.core_transaction() as connection:
        created = NewOperation.pending(order_id, account_name, utcnow())
        inserted = connection.execute(
            _insert_unless_submitted(connection.dialect.name), asdict(created)
        ).first()
        if inserted is None:  # submitted before (or just now, by a racing submit)
            existing = _existing(connection, order_id, account_name)
            if existing is None:  # a racing submit's row vanished with its rollback
                raise IntegrityError("submit", {}, Exception("the order's operation vanished"))
            return existing, False
        _record_created(connection, created, services)
        return created.id, True


@functools.lru_cache(maxsize=2)
def _insert_unless_submitted(dialect_name: str) -> Any:
    """INSERT ... ON CONFLICT (the first-submission unique index) DO NOTHING RETURNING id."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    return (
        dialect.insert(OPERATIONS_TABLE)
        .values(dispatched_at=db_now())
        .on_conflict_do_nothing(
            index_elements=["order_id"], index_where=text(FIRST_ORDER_DEDUCTION)
        )
        .returning(OPERATIONS_TABLE.c.id)
    )


def _record_created(connection: Connection, created: NewOperation, services: Services) -> None:
    """Its OPERATION_CREATED event (and metric counter), written with the transaction."""
    operation_logger(connection, created, services.logger).log_action_with_timing(
        created.id, LogAction.OPERATION_CREATED, f"operation created for order {created.order_id}"
    )


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

    @classmethod
    def pending(cls, order_id: str, account_name: str | None, now: datetime) -> NewOperation:
        return cls(line_items=None, **new_order_deduction(order_id, account_name, now))


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


def checked_order(order_id: object, account_name: object = None) -> tuple[str, str | None]:
    """(order_id, account_name) as the submits store them (stripped), or InvalidInput naming
    the malformed one."""
    return _checked_order_id(order_id), _checked_account_name(account_name)


@dataclass(frozen=True)
class BatchSubmission:
    """What :func:`submit_operations` did: every order's operation, in input order (an order
    given twice has its id twice), and the operations it created (each enqueued)."""

    operation_ids: list[uuid.UUID]
    created: list[uuid.UUID]


# (stage, done, total): "saved" once the batch committed, then "enqueued" after each publish.
BatchProgress = Callable[[str, int, int], None]


def submit_operations(
    orders: Iterable[tuple[str, str | None]],
    *,
    services: Services | None = None,
    on_progress: BatchProgress | None = None,
) -> BatchSubmission:
    """Record many orders' operations in one transaction, then enqueue the new ones over one
    broker connection: for the shop backend's imports and catch-ups.

    Each order gets what :func:`submit_operation` would give it, called once per entry in
    order: an order that already has an operation (or a retry's successor) keeps it, an order
    given twice maps to one operation (the account of its first entry is recorded), an account
    contradicting the recorded one is refused. Raises InvalidInput naming the first bad entry
    (``orders[i]``), with nothing written; BatchEnqueueFailed, carrying every id, when the
    broker could not take some messages (those operations stay PENDING for the sweep).
    """
    entries = _checked_entries(orders)
    services = services or default_services()
    operation_ids, created = _create_batch(services, entries)
    submission = BatchSubmission(operation_ids, [operation.id for operation in created])
    if on_progress is not None:
        on_progress("saved", len(created), len(created))
    published = 0

    def count(done: int) -> None:
        nonlocal published
        published = done
        if on_progress is not None:
            on_progress("enqueued", done, len(created))

    dispatches = [(operation.id, OperationStatus.PENDING, FIRST_DISPATCH) for operation in created]
    try:
        services.dispatcher.enqueue_pipelines(dispatches, count)
    except Exception as error:
        raise BatchEnqueueFailed(
            operation_ids,
            submission.created,
            submission.created[published:],
            f"{type(error).__name__}: {error}",
        ) from error
    return submission


def _checked_entries(orders: Iterable[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    if isinstance(orders, str | bytes):
        raise InvalidInput("orders must be (order_id, account_name) pairs, not one string")
    entries = []
    for index, entry in enumerate(orders):
        if isinstance(entry, str | bytes) or not isinstance(entry, Sequence) or len(entry) != 2:
            shown = type(entry).__name__
            raise InvalidInput(f"orders[{index}]: expected (order_id, account_name), got {shown}")
        try:
            entries.append(checked_order(*entry))
        except InvalidInput as error:
            raise InvalidInput(f"orders[{index}]: {error}") from None
    return entries


def _create_batch(
    services: Services, entries: Sequence[tuple[str, str | None]]
) -> tuple[list[uuid.UUID], list[NewOperation]]:
    """Every entry's operation id and the operations created, committed in one transaction."""
    first_accounts = _first_accounts(entries)
    for attempt in range(1, _BATCH_ATTEMPTS + 1):
        try:
            with services.database.core_transaction() as connection:
                return _write_batch(connection, services, entries, first_accounts)
        except IntegrityError:
            # A concurrent submit inserted one of these orders first: the next attempt finds it.
            if attempt == _BATCH_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _first_accounts(entries: Sequence[tuple[str, str | None]]) -> dict[str, str | None]:
    """Each order's account as its first entry gives it (what a submit one by one would
    record); a later entry naming another account is the contradiction _check_account
    refuses."""
    first: dict[str, str | None] = {}
    for index, (order_id, account_name) in enumerate(entries):
        if order_id not in first:
            first[order_id] = account_name
            continue
        recorded = first[order_id]
        if account_name is not None and recorded not in (None, account_name):
            raise InvalidInput(
                f"orders[{index}]: account_name: order {order_id} is given for account "
                f"{recorded!r} earlier in the batch, not {account_name!r}"
            )
    return first


def _write_batch(
    connection: Connection,
    services: Services,
    entries: Sequence[tuple[str, str | None]],
    first_accounts: dict[str, str | None],
) -> tuple[list[uuid.UUID], list[NewOperation]]:
    found = _existing_many(connection, list(first_accounts))
    for index, (order_id, account_name) in enumerate(entries):
        if order_id in found:
            operation_id, recorded = found[order_id]
            try:
                _check_account(order_id, operation_id, recorded, account_name)
            except InvalidInput as error:
                raise InvalidInput(f"orders[{index}]: {error}") from None
    now = utcnow()
    created = [
        NewOperation.pending(order_id, account_name, now)
        for order_id, account_name in first_accounts.items()
        if order_id not in found
    ]
    if created:
        connection.execute(_INSERT_OPERATION, [asdict(operation) for operation in created])
    for operation in created:
        _record_created(connection, operation, services)
    ids = {order_id: operation_id for order_id, (operation_id, _) in found.items()}
    ids.update((operation.order_id, operation.id) for operation in created)
    return [ids[order_id] for order_id, _ in entries], created


def _existing_many(
    connection: Connection, order_ids: Sequence[str]
) -> dict[str, tuple[uuid.UUID, str | None]]:
    """The live deduction (id, recorded account) of each of ``order_ids`` that has one."""
    found: dict[str, tuple[uuid.UUID, str | None]] = {}
    for start in range(0, len(order_ids), _LOOKUP_CHUNK):
        chunk = order_ids[start : start + _LOOKUP_CHUNK]
        for order_id, operation_id, recorded in connection.execute(
            _FIND_DEDUCTIONS, {"find_order_ids": chunk}
        ):
            found[order_id] = (uuid.UUID(str(operation_id)), recorded)
    return found


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

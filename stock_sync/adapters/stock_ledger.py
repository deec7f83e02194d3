"""Stock primitives on the database: every change of a level writes a ledger row with it.

All functions run inside the caller's transaction and never commit. Arithmetic happens in SQL
(``quantity = quantity - :n WHERE quantity >= :n``), and stock rows are always touched in SKU
order (:func:`stock_sync.domain.stock.stock_lock_key`), the one lock order of the codebase.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, exists, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from stock_sync.adapters.models import (
    SKU_MAX_LENGTH,
    STOCK_LEVELS_TABLE,
    STOCK_MOVEMENTS_TABLE,
    StockLevel,
    StockMovement,
    utcnow,
)
from stock_sync.adapters.redaction import shown_value
from stock_sync.domain.errors import InvalidInput
from stock_sync.domain.stock import (
    LineItem,
    MovementReason,
    correction_delta,
    in_lock_order,
    stock_lock_key,
    validate_stock_levels,
)


@dataclass(frozen=True)
class Movement:
    """A ledger row as callers see it."""

    sku: str
    delta: int
    line_item_id: str | None


@dataclass(frozen=True)
class StockChange:
    sku: str
    previous: int
    quantity: int


@dataclass(frozen=True)
class LedgerOutcome:
    """What a deduction or restoration wrote; ``already_done`` when an earlier call had."""

    movements: tuple[Movement, ...]
    already_done: bool


def validate_sku(sku: str) -> str:
    """A stripped, non-empty SKU of allowed length, or InvalidInput naming the problem."""
    cleaned = sku.strip()
    if not cleaned:
        raise InvalidInput("SKU must not be empty")
    if len(cleaned) > SKU_MAX_LENGTH:
        raise InvalidInput(f"SKU is longer than {SKU_MAX_LENGTH} characters")
    return cleaned


def _insert_missing_level(session: Session, sku: str) -> None:
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(StockLevel).values(sku=sku, quantity=0, updated_at=utcnow())
    session.execute(statement.on_conflict_do_nothing(index_elements=["sku"]))


def get_stock(session: Session, sku: str) -> int | None:
    """The quantity of ``sku``, or None when it was never stocked."""
    return session.scalar(select(StockLevel.quantity).where(StockLevel.sku == sku))


def get_levels(session: Session | Connection, skus: Iterable[str]) -> dict[str, int]:
    """Quantities of the SKUs that exist; unknown ones are absent from the result."""
    rows = _core(session).execute(_LEVELS_OF, {"skus": list(set(skus))})
    return {sku: quantity for sku, quantity in rows}


# Built once: constructing the SELECT cost more CPU than running it.
_LEVELS_OF = select(STOCK_LEVELS_TABLE.c.sku, STOCK_LEVELS_TABLE.c.quantity).where(
    STOCK_LEVELS_TABLE.c.sku.in_(bindparam("skus", expanding=True))
)


# stock_levels.quantity and stock_movements.delta are 4-byte INTEGER columns; SQLite would
# silently store a larger value as a float or refuse it with an OverflowError.
MAX_STOCK_QUANTITY = 2**31 - 1


def _checked_quantity(quantity: int) -> int:
    if isinstance(quantity, bool) or not isinstance(quantity, int):
        raise InvalidInput(f"quantity must be a whole number, got {shown_value(quantity)}")
    if not 0 <= quantity <= MAX_STOCK_QUANTITY:
        raise InvalidInput(
            f"quantity must be >= 0 and <= {MAX_STOCK_QUANTITY}, got {shown_value(quantity)}"
        )
    return quantity


def set_stock(session: Session, sku: str, quantity: int) -> StockChange:
    """Set a level to ``quantity`` (0 to MAX_STOCK_QUANTITY); the difference is recorded as a
    correction movement. A refused quantity raises InvalidInput before anything is written."""
    sku = validate_sku(sku)
    quantity = _checked_quantity(quantity)
    _insert_missing_level(session, sku)
    previous = session.scalar(
        select(StockLevel.quantity).where(StockLevel.sku == sku).with_for_update()
    )
    assert previous is not None  # inserted just above
    delta = correction_delta(previous, quantity)
    if delta:
        session.execute(
            update(StockLevel)
            .where(StockLevel.sku == sku)
            .values(quantity=StockLevel.quantity + delta, updated_at=utcnow())
        )
        session.add(StockMovement(sku=sku, delta=delta, reason=MovementReason.CORRECTION.value))
        session.flush()
    return StockChange(sku=sku, previous=previous, quantity=quantity)


def _movements_of(
    session: Session | Connection, operation_id: uuid.UUID, reason: MovementReason
) -> list[Movement]:
    movements = STOCK_MOVEMENTS_TABLE.c
    rows = _core(session).execute(
        select(movements.sku, movements.delta, movements.line_item_id)
        .where(movements.operation_id == operation_id, movements.reason == reason.value)
        .order_by(movements.sku, movements.line_item_id)
    )
    return [Movement(sku, delta, line_item_id) for sku, delta, line_item_id in rows]


def _core(session: Session | Connection) -> Connection:
    """The connection to run Core statements on, in the caller's transaction."""
    return session.connection() if isinstance(session, Session) else session


def deduction_movements(session: Session | Connection, operation_id: uuid.UUID) -> list[Movement]:
    """The deduction rows recorded for an operation (empty when nothing was deducted)."""
    return _movements_of(session, operation_id, MovementReason.DEDUCTION)


_levels = STOCK_LEVELS_TABLE.c
# Built once (a fresh statement per line cost about 90 us of CPU): the conditional UPDATE
# that never oversells, and the ledger rows.
_TAKE_STOCK = (
    update(STOCK_LEVELS_TABLE)
    .where(_levels.sku == bindparam("take_sku"), _levels.quantity >= bindparam("take"))
    .values(quantity=_levels.quantity - bindparam("take"), updated_at=bindparam("taken_at"))
)
_INSERT_MOVEMENTS = insert(STOCK_MOVEMENTS_TABLE)


def deduct_for_operation(
    session: Session | Connection,
    operation_id: uuid.UUID,
    line_items: Sequence[LineItem],
    *,
    known_not_deducted: bool = False,
) -> LedgerOutcome:
    """Take every line out of stock, or none; record one deduction row per line.

    Raises InsufficientStock / UnknownSku (with per-line details, against the levels before
    this call) when any line cannot be served; the caller's transaction must then roll back,
    which undoes the lines already taken (``Database.transaction`` does). A second call for
    the same operation changes nothing: it finds the recorded rows, or, with
    ``known_not_deducted`` (the caller proved it under the operation's row lock and skips that
    query), the ledger's unique key refuses the second set of rows.
    """
    if not known_not_deducted:
        recorded = deduction_movements(session, operation_id)
        if recorded:
            return LedgerOutcome(movements=tuple(recorded), already_done=True)
    if not line_items:
        raise InvalidInput(f"operation {operation_id} has no line items to deduct")
    movements: list[Movement] = []
    now = utcnow()
    connection = _core(session)
    for line in in_lock_order(line_items):
        taken = connection.execute(
            _TAKE_STOCK, {"take_sku": line.sku, "take": line.quantity, "taken_at": now}
        )
        if taken.rowcount != 1:
            raise _shortage(session, line_items, movements)
        movements.append(Movement(line.sku, -line.quantity, line.id))
    connection.execute(
        _INSERT_MOVEMENTS,
        [
            {
                "sku": movement.sku,
                "delta": movement.delta,
                "reason": MovementReason.DEDUCTION.value,
                "operation_id": operation_id,
                "line_item_id": movement.line_item_id,
                "created_at": now,
            }
            for movement in movements
        ],
    )
    return LedgerOutcome(movements=tuple(movements), already_done=False)


def _shortage(
    session: Session | Connection, line_items: Sequence[LineItem], taken: Sequence[Movement]
) -> Exception:
    """The validation error for the levels as they were before this deduction began."""
    levels = get_levels(session, (line.sku for line in line_items))
    for movement in taken:
        levels[movement.sku] -= movement.delta  # give back what this call already took
    return validate_stock_levels(line_items, levels).to_error()


def restore_for_operation(
    session: Session, operation_id: uuid.UUID, adjustment_operation_id: uuid.UUID
) -> LedgerOutcome:
    """Negate exactly the deduction rows of ``operation_id`` not negated yet.

    The restoration rows belong to the adjustment operation and name the deduction they
    reverse (unique), so no deduction is ever restored twice.
    """
    movements = [
        _restore(session, deduction, adjustment_operation_id)
        for deduction in outstanding_deductions(session, operation_id)
    ]
    return LedgerOutcome(movements=tuple(movements), already_done=not movements)


def outstanding_deductions(session: Session, operation_id: uuid.UUID) -> list[StockMovement]:
    """The deduction rows of ``operation_id`` that nothing reversed yet (restored or handed
    over), in the lock order."""
    reversal = aliased(StockMovement)
    outstanding = session.scalars(
        select(StockMovement).where(
            StockMovement.operation_id == operation_id,
            StockMovement.reason == MovementReason.DEDUCTION.value,
            ~exists().where(reversal.reverses_movement_id == StockMovement.id),
        )
    ).all()
    # Sorted here, not by SQL ORDER BY: the database collation may disagree with the lock order.
    return sorted(outstanding, key=lambda row: stock_lock_key(row.sku, row.line_item_id))


def hand_over_deduction(
    session: Session, from_operation_id: uuid.UUID, to_operation_id: uuid.UUID
) -> LedgerOutcome:
    """Make the outstanding deduction of ``from_operation_id`` the deduction of
    ``to_operation_id``: per line, a handover row reversing it and a deduction row of the new
    owner. No stock level changes (the two rows cancel out), so nothing is deducted twice;
    the ledger's unique reversal key lets a deduction be handed over (or restored) once."""
    movements = []
    for deduction in outstanding_deductions(session, from_operation_id):
        session.add(
            StockMovement(
                sku=deduction.sku,
                delta=-deduction.delta,
                reason=MovementReason.HANDOVER.value,
                operation_id=from_operation_id,
                line_item_id=deduction.line_item_id,
                reverses_movement_id=deduction.id,
            )
        )
        session.add(
            StockMovement(
                sku=deduction.sku,
                delta=deduction.delta,
                reason=MovementReason.DEDUCTION.value,
                operation_id=to_operation_id,
                line_item_id=deduction.line_item_id,
            )
        )
        movements.append(Movement(deduction.sku, deduction.delta, deduction.line_item_id))
    session.flush()
    return LedgerOutcome(movements=tuple(movements), already_done=not movements)


def _restore(
    session: Session, deduction: StockMovement, adjustment_operation_id: uuid.UUID
) -> Movement:
    quantity = -deduction.delta
    session.execute(
        update(StockLevel)
        .where(StockLevel.sku == deduction.sku)
        .values(quantity=StockLevel.quantity + quantity, updated_at=utcnow())
    )
    session.add(
        StockMovement(
            sku=deduction.sku,
            delta=quantity,
            reason=MovementReason.RESTORATION.value,
            operation_id=adjustment_operation_id,
            line_item_id=deduction.line_item_id,
            reverses_movement_id=deduction.id,
        )
    )
    session.flush()
    return Movement(deduction.sku, quantity, deduction.line_item_id)


def ledger_sum(session: Session, sku: str) -> int:
    """Sum of every movement of ``sku``: equals its level when the ledger is whole."""
    total = session.scalar(
        select(func.coalesce(func.sum(StockMovement.delta), 0)).where(StockMovement.sku == sku)
    )
    return int(total or 0)

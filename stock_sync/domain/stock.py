"""Pure stock arithmetic: what an order asks for, and whether the shelves can serve it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from stock_sync.domain.errors import InsufficientStock, InvalidInput, StockShortage, UnknownSku


@dataclass(frozen=True)
class LineItem:
    """One line of a marketplace order, as snapshotted on the operation."""

    id: str
    offer_id: str
    sku: str
    quantity: int

    def __post_init__(self) -> None:
        if not self.sku:
            raise InvalidInput(f"line item {self.id!r}: sku must not be empty")
        if self.quantity < 1:
            raise InvalidInput(f"line item {self.id!r}: quantity must be >= 1, got {self.quantity}")

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "offer_id": self.offer_id,
            "sku": self.sku,
            "quantity": self.quantity,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> LineItem:
        quantity = data["quantity"]
        if not isinstance(quantity, int):
            raise InvalidInput(f"line item {data.get('id')!r}: quantity must be an integer")
        return cls(
            id=str(data["id"]),
            offer_id=str(data.get("offer_id", "")),
            sku=str(data["sku"]),
            quantity=quantity,
        )


@dataclass(frozen=True)
class ValidationResult:
    """The outcome of checking an order's lines against stock levels."""

    shortages: tuple[StockShortage, ...] = ()
    unknown_skus: tuple[str, ...] = ()
    checked_lines: int = 0
    requested: Mapping[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.shortages and not self.unknown_skus

    def to_error(self) -> UnknownSku | InsufficientStock:
        """The error to raise for a failed validation (unknown SKUs are named first)."""
        if self.unknown_skus:
            return UnknownSku(self.unknown_skus, validation_result=self)
        return InsufficientStock(self.shortages, validation_result=self)


def stock_lock_key(sku: str, line_id: str | None = None) -> tuple[str, str]:
    """The one order in which every path locks stock rows: SKU, then line id, by code point.

    Decided here and never by SQL ``ORDER BY``: a database collation (en_US, ICU) sorts
    ``"apple-1"`` before ``"Zebra-1"``, code points the other way round, and two paths that
    disagree deadlock.
    """
    return sku, line_id or ""


def in_lock_order(line_items: Iterable[LineItem]) -> list[LineItem]:
    """Lines in the one order every stock lock is taken in (:func:`stock_lock_key`)."""
    return sorted(line_items, key=lambda line: stock_lock_key(line.sku, line.id))


def required_quantities(line_items: Iterable[LineItem]) -> dict[str, int]:
    """Total quantity asked for per SKU, in SKU order (two lines may share a SKU)."""
    totals: dict[str, int] = {}
    for line in in_lock_order(line_items):
        totals[line.sku] = totals.get(line.sku, 0) + line.quantity
    return totals


def validate_stock_levels(
    line_items: Sequence[LineItem], levels: Mapping[str, int]
) -> ValidationResult:
    """Check every SKU exists in ``levels`` and holds enough for all lines asking for it."""
    requested = required_quantities(line_items)
    unknown = tuple(sku for sku in requested if sku not in levels)
    shortages = tuple(
        StockShortage(sku=sku, requested=quantity, available=levels[sku])
        for sku, quantity in requested.items()
        if sku in levels and levels[sku] < quantity
    )
    return ValidationResult(
        shortages=shortages,
        unknown_skus=unknown,
        checked_lines=len(line_items),
        requested=requested,
    )


def correction_delta(current: int, target: int) -> int:
    """The ledger delta that moves a stock level from ``current`` to ``target``."""
    if target < 0:
        raise InvalidInput(f"quantity must be >= 0, got {target}")
    return target - current


class MovementReason(str, Enum):
    """Why a stock level changed; each ledger row names one."""

    CORRECTION = "correction"
    DEDUCTION = "deduction"
    RESTORATION = "restoration"
    # A FAILED operation's deduction passed to the successor a retry made (the successor
    # records it as its own deduction row): two rows of opposite sign, no level changes.
    HANDOVER = "handover"

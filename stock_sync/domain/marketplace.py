"""Agreement with the marketplace: what an operation's order should show on Allegro, as a pure
verdict the marketplace audit applies to each order it reads."""

from __future__ import annotations

from enum import Enum

# The fulfillment status our sync sets, and the statuses the seller moves an order on to:
# an order at one of them agrees with a COMPLETED operation.
SYNCED_FULFILLMENT_STATUS = "PROCESSING"
AT_OR_PAST_SYNC = frozenset(
    {SYNCED_FULFILLMENT_STATUS, "READY_FOR_SHIPMENT", "READY_FOR_PICKUP", "SENT", "PICKED_UP"}
)
ORDER_CANCELLED = "CANCELLED"


class Drift(str, Enum):
    """How an order disagrees with its settled operation."""

    # COMPLETED, but the order is back at the status it had before our sync
    NOT_SYNCED = "not_synced"
    # COMPLETED, but the buyer cancelled the order upstream: its stock must come back
    CANCELLED_UPSTREAM = "cancelled_upstream"
    # CANCELLED by us, but the order still shows our sync's status
    NOT_ROLLED_BACK = "not_rolled_back"


def drift_of(
    operation_status: str,
    status_before_sync: str | None,
    order_status: str,
    fulfillment_status: str,
) -> Drift | None:
    """The drift between a settled operation and its order as read now, or None.

    A status the seller moved on (READY_FOR_SHIPMENT, SENT...) is never drift; nor is an order
    cancelled upstream for an operation cancelled already.
    """
    if operation_status == "completed":
        if order_status == ORDER_CANCELLED:
            return Drift.CANCELLED_UPSTREAM
        if fulfillment_status == (status_before_sync or "NEW"):
            return Drift.NOT_SYNCED
        return None
    if operation_status == "cancelled":
        if order_status != ORDER_CANCELLED and fulfillment_status == SYNCED_FULFILLMENT_STATUS:
            return Drift.NOT_ROLLED_BACK
        return None
    return None

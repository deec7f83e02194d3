"""Every error stock-sync raises on purpose, under one root.

Each class carries the data a caller needs to act on it, and says whether retrying
can help (``retryable``); the Celery tasks map that flag to retry or fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID


class StockSyncError(Exception):
    """Root of every error stock-sync raises on purpose."""

    retryable: bool = False


class ConfigurationError(StockSyncError):
    """A setting is malformed; the message names the environment variable."""


class UnknownSetting(ConfigurationError):
    """A STOCK_SYNC_* variable that is no setting (a typo); the message names the closest one."""


class InvalidInput(StockSyncError):
    """A caller passed a malformed value; the message names the argument."""


class InvalidTransition(StockSyncError):
    """A status change the lifecycle table does not allow."""

    def __init__(self, from_status: str, to_status: str) -> None:
        self.from_status = from_status
        self.to_status = to_status
        super().__init__(f"invalid status transition {from_status} -> {to_status}")


class OperationNotFound(StockSyncError):
    """No stock operation has this id."""

    def __init__(self, operation_id: UUID | str) -> None:
        self.operation_id = operation_id
        super().__init__(f"operation not found: {operation_id}")


class CancellationRefused(StockSyncError):
    """The operation is in a status that cannot be cancelled."""

    def __init__(self, operation_id: UUID | str, status: str) -> None:
        self.operation_id = operation_id
        self.status = status
        super().__init__(f"operation {operation_id} cannot be cancelled: it is {status}")


class RollbackRetryRefused(StockSyncError):
    """A microservice rollback cannot be retried: it did not fail, or a newer one is pending
    or completed."""

    def __init__(self, operation_id: UUID | str, reason: str) -> None:
        self.operation_id = operation_id
        super().__init__(f"cannot retry the rollback of {operation_id}: {reason}")


class RetryRefused(StockSyncError):
    """A FAILED operation cannot be retried: it is not FAILED, not an order deduction, or was
    retried already."""

    def __init__(self, operation_id: UUID | str, reason: str) -> None:
        self.operation_id = operation_id
        self.reason = reason
        super().__init__(f"cannot retry {operation_id}: {reason}")


@dataclass(frozen=True)
class StockShortage:
    """One line that cannot be served: how much was asked for and how much there is."""

    sku: str
    requested: int
    available: int


class InsufficientStock(StockSyncError):
    """At least one line asks for more than the warehouse holds; stock may still arrive."""

    retryable = True

    def __init__(
        self, shortages: Sequence[StockShortage], *, validation_result: object = None
    ) -> None:
        self.shortages = tuple(shortages)
        self.validation_result = validation_result
        listed = ", ".join(
            f"{s.sku} (requested {s.requested}, available {s.available})" for s in self.shortages
        )
        super().__init__(f"insufficient stock: {listed}")


class UnknownSku(StockSyncError):
    """A line names a SKU the warehouse has never stocked; it may be added later."""

    retryable = True

    def __init__(self, skus: Sequence[str], *, validation_result: object = None) -> None:
        self.skus = tuple(skus)
        self.validation_result = validation_result
        super().__init__(f"unknown SKU: {', '.join(self.skus)}")


class OrderNotReady(StockSyncError):
    """The marketplace order is not paid yet (BOUGHT or FILLED_IN)."""

    retryable = True

    def __init__(self, order_id: str, order_status: str) -> None:
        self.order_id = order_id
        self.order_status = order_status
        super().__init__(f"order {order_id} is not ready for processing: {order_status}")


class EnqueueFailed(StockSyncError):
    """The operation is saved as PENDING but its first task could not be enqueued.

    Nothing is lost: the stuck-operation sweep re-drives it once the broker is back.
    """

    def __init__(self, operation_id: UUID, cause: str) -> None:
        self.operation_id = operation_id
        super().__init__(
            f"operation {operation_id} saved as pending but not enqueued ({cause}); "
            "the sweep will re-drive it"
        )


class BatchEnqueueFailed(StockSyncError):
    """A batch is saved (its new operations PENDING) but some of them could not be enqueued.

    ``operation_ids``: every order's operation, in input order; ``created``: the operations
    the batch created; ``not_enqueued``: those of them with no message (the sweep re-drives
    them once the broker is back).
    """

    def __init__(
        self,
        operation_ids: Sequence[UUID],
        created: Sequence[UUID],
        not_enqueued: Sequence[UUID],
        cause: str,
    ) -> None:
        self.operation_ids = list(operation_ids)
        self.created = list(created)
        self.not_enqueued = list(not_enqueued)
        super().__init__(
            f"{len(self.not_enqueued)} of {len(self.created)} new operations saved as pending "
            f"but not enqueued ({cause}); the sweep will re-drive them"
        )


# --- the Allegro microservice -------------------------------------------------------------


class MicroserviceError(StockSyncError):
    """The microservice call did not give a usable answer."""

    # Whether a write that ended in this error may still have taken effect: only an answer
    # that refuses it (404, 409, 422, 429) proves it did not.
    may_have_taken_effect: bool = True

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class TransientMicroserviceError(MicroserviceError):
    """Retrying later may succeed (network, timeout, 429, 5xx, revision conflict)."""

    retryable = True


class MicroserviceUnavailable(TransientMicroserviceError):
    """The connection failed: refused, reset or DNS."""


class MicroserviceTimeout(TransientMicroserviceError):
    """The microservice did not answer within the configured timeout."""


class MicroserviceRateLimited(TransientMicroserviceError):
    """429: wait at least ``retry_after_s`` seconds before the next call."""

    may_have_taken_effect = False

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, status_code=429)


class MicroserviceServerError(TransientMicroserviceError):
    """5xx from the microservice; ``retry_after_s`` is set when it sent Retry-After."""

    def __init__(
        self, message: str, *, status_code: int, retry_after_s: float | None = None
    ) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, status_code=status_code)


class OrderNotFound(TransientMicroserviceError):
    """404 ORDER_NOT_FOUND: Allegro can 404 right after an order event, so it is retried."""

    may_have_taken_effect = False

    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        super().__init__(f"order not found in the microservice: {order_id}", status_code=404)


class RevisionConflict(TransientMicroserviceError):
    """409 REVISION_CONFLICT: reload the order and try again."""

    may_have_taken_effect = False


class IdempotencyKeyInFlight(TransientMicroserviceError):
    """409 IDEMPOTENCY_KEY_IN_FLIGHT: the first request with this key is still being handled,
    and may yet take effect; the same key and body may be sent again later."""


class PermanentMicroserviceError(MicroserviceError):
    """Retrying cannot help: the request or the answer is wrong."""


class UnprocessableRequest(PermanentMicroserviceError):
    """422: the microservice refused the request for good."""

    may_have_taken_effect = False


class IdempotencyKeyReused(UnprocessableRequest):
    """422 IDEMPOTENCY_KEY_REUSED: the key is bound to another body. Each of our keys names
    exactly one payload, so this is a defect, never retried."""


class ContractViolation(PermanentMicroserviceError):
    """The answer is not valid JSON or breaks the contract; the message names the field."""

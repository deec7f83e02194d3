"""The marketplace audit: verify that Allegro agrees with the operations settled lately, and
put right what does not (``stock-sync check --marketplace``, and a beat entry).

Each operation settled in the window (its order's latest: a retried one's successor) has its
order read, at a bounded rate, in bounded batches; :func:`stock_sync.domain.marketplace.drift_of`
judges it. With ``repair``, each drift is put right through the pipeline's own paths, with their
keys and audit events:

- COMPLETED, order back at its pre-sync status: the sync PUT again, a key of its own recorded
  first (StockSynchronizationService.resync);
- COMPLETED, order cancelled upstream: the operation is cancelled by ``marketplace`` (stock
  restored, no PUT: the marketplace cancelled the order itself);
- CANCELLED, order still at the sync's status: a new microservice rollback (claims every sync
  PUT, then puts the status back), unless one is pending already.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select

from stock_sync.adapters.db import Database
from stock_sync.adapters.microservice_client import MicroserviceClient
from stock_sync.adapters.models import PendingStockOperation, read_database_now
from stock_sync.adapters.redaction import one_line
from stock_sync.domain.errors import MicroserviceError, StockSyncError
from stock_sync.domain.marketplace import Drift, drift_of
from stock_sync.domain.statuses import OperationStatus, OperationType
from stock_sync.services.operation_cancellation_service import (
    MARKETPLACE,
    OperationCancellationService,
)
from stock_sync.services.stock_synchronization_service import StockSynchronizationService

S = OperationStatus
# Allegro allows 9,000 requests a minute per client; the audit shares that with the pipeline.
MAX_RATE_PER_S = 150.0


@dataclass(frozen=True)
class Settled:
    """An operation as the audit selects it."""

    id: uuid.UUID
    order_id: str
    status: str
    status_before_sync: str | None


@dataclass(frozen=True)
class Found:
    """One drift: the operation, its order, what the order should show and shows."""

    operation_id: uuid.UUID
    order_id: str
    drift: Drift
    fulfillment_status: str
    order_status: str
    repair: str | None = None  # what the repair did, when it ran

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation_id": str(self.operation_id),
            "order_id": self.order_id,
            "drift": self.drift.value,
            "fulfillment_status": self.fulfillment_status,
            "order_status": self.order_status,
            "repair": self.repair,
        }


@dataclass
class AuditReport:
    """What one audit did."""

    since: datetime
    repair: bool
    checked: int = 0
    drift: list[Found] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # "<order>: <why>"
    repaired: int = 0

    @property
    def agrees(self) -> bool:
        """No drift left unrepaired (an unreadable order is not drift: the next run reads it)."""
        return len(self.drift) == self.repaired

    def to_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "repair": self.repair,
            "checked": self.checked,
            "drift": len(self.drift),
            "repaired": self.repaired,
            "unreadable": len(self.unreadable),
            "agrees": self.agrees,
            "found": [found.to_dict() for found in self.drift],
            "unreadable_orders": self.unreadable,
        }


class RateLimiter:
    """At most ``per_second`` calls of :meth:`wait` a second, spaced evenly."""

    def __init__(
        self,
        per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._interval = 1.0 / min(per_second, MAX_RATE_PER_S)
        self._clock, self._sleep = clock, sleep
        self._next = clock()

    def wait(self) -> None:
        now = self._clock()
        if now < self._next:
            self._sleep(self._next - now)
            now = self._next
        self._next = now + self._interval


class MarketplaceAudit:
    """Reads the orders of settled operations and reports (and repairs) drift."""

    def __init__(
        self,
        *,
        database: Database,
        client: MicroserviceClient,
        synchronization: StockSynchronizationService,
        cancellation: OperationCancellationService,
        rate_per_s: float,
        batch_size: int,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._database = database
        self._client = client
        self._synchronization = synchronization
        self._cancellation = cancellation
        self._batch_size = batch_size
        self._limiter = limiter or RateLimiter(rate_per_s)

    def run(
        self,
        *,
        since_s: float,
        repair: bool,
        progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> AuditReport:
        """Audit the operations settled within the last ``since_s`` seconds (database clock);
        ``progress(done, total)`` after each."""
        with self._database.transaction() as session:
            since = read_database_now(session.connection()) - timedelta(seconds=since_s)
            total = int(session.scalar(select(func.count()).where(_settled_since(since))) or 0)
        report = AuditReport(since=since, repair=repair)
        for batch in self._batches(since):
            for settled in batch:
                self._audit(settled, report)
                progress(report.checked, total)
        return report

    def _batches(self, since: datetime) -> Iterator[list[Settled]]:
        op = PendingStockOperation
        after: uuid.UUID | None = None
        while True:
            query = (
                select(op.id, op.order_id, op.status, op.fulfillment_status_before_sync)
                .where(_settled_since(since))
                .order_by(op.id)
                .limit(self._batch_size)
            )
            if after is not None:
                query = query.where(op.id > after)
            with self._database.transaction() as session:
                batch = [Settled(*row) for row in session.execute(query)]
            if not batch:
                return
            yield batch
            after = batch[-1].id

    def _audit(self, settled: Settled, report: AuditReport) -> None:
        self._limiter.wait()
        report.checked += 1
        try:
            order = self._client.get_order(settled.order_id)
        except MicroserviceError as error:
            report.unreadable.append(f"{settled.order_id}: {one_line(str(error))}")
            return
        drift = drift_of(
            settled.status, settled.status_before_sync, order.status, order.fulfillment_status
        )
        if drift is None:
            return
        found = Found(settled.id, settled.order_id, drift, order.fulfillment_status, order.status)
        if report.repair:
            outcome = self._repair(found, order)
            found = Found(**{**found.__dict__, "repair": outcome})
            report.repaired += outcome.startswith(REPAIRED)
        report.drift.append(found)

    def _repair(self, found: Found, order: Any) -> str:
        """Put one drift right; what it did, starting with REPAIRED when it did."""
        reason = f"the marketplace audit found {found.drift.value}"
        try:
            if found.drift is Drift.NOT_SYNCED:
                sent = self._synchronization.resync(found.operation_id, order, reason)
                return f"{REPAIRED}: synced again" if sent else "not repaired: no longer completed"
            if found.drift is Drift.CANCELLED_UPSTREAM:
                self._cancellation.cancel_operation(
                    found.operation_id, cancelled_by=MARKETPLACE, reason=reason
                )
                return f"{REPAIRED}: cancelled by marketplace, stock restored"
            rollback = self._cancellation.roll_back_again(found.operation_id, reason)
            if rollback is None:
                return f"{REPAIRED}: a microservice rollback is pending already"
            if not rollback.enqueued:  # recorded: it waits for the stuck sweep's re-drive
                return f"{REPAIRED}: microservice rollback {rollback.rollback_id} not enqueued"
            return f"{REPAIRED}: microservice rollback {rollback.rollback_id} enqueued"
        except StockSyncError as error:
            return f"not repaired: {one_line(str(error))}"


REPAIRED = "repaired"


def _settled_since(since: datetime) -> Any:
    """Order deductions (each order's latest) that settled since ``since``: COMPLETED, or
    CANCELLED by us after a sync PUT may have left."""
    op = PendingStockOperation
    return and_(
        op.operation_type == OperationType.ORDER_DEDUCTION.value,
        op.successor_operation_id.is_(None),
        or_(
            and_(op.status == S.COMPLETED.value, op.completed_at >= since),
            and_(
                op.status == S.CANCELLED.value,
                op.cancelled_at >= since,
                op.sync_put_sent_at.is_not(None),
                op.cancelled_by != MARKETPLACE,
            ),
        ),
    )

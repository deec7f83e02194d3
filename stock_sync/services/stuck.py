"""What "stuck" means, in one place: shared by the sweep, the metrics and the alerts.

An operation is stuck when it is still live (not COMPLETED, FAILED or CANCELLED) and has made
no progress for ``stuck_after_s``, counted from its last change or its planned retry,
whichever is later. The predicate leads with ``status`` and ``updated_at`` so PostgreSQL
answers it from the (status, updated_at) index: its cost is the number of stuck rows.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, or_

from stock_sync.adapters.models import PendingStockOperation
from stock_sync.domain.statuses import ACTIVE_STATUSES

LIVE_STATUS_VALUES = sorted(status.value for status in ACTIVE_STATUSES)


def stuck_since(now: datetime, stuck_after_s: float) -> datetime:
    return now - timedelta(seconds=stuck_after_s)


def is_stuck(now: datetime, stuck_after_s: float) -> ColumnElement[bool]:
    """SQL condition selecting stuck operations at ``now``."""
    threshold = stuck_since(now, stuck_after_s)
    op = PendingStockOperation
    return and_(
        op.status.in_(LIVE_STATUS_VALUES),
        op.updated_at < threshold,
        or_(op.next_retry_at.is_(None), op.next_retry_at < threshold),
    )

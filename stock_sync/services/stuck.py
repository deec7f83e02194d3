"""What "stuck" means, in one place: shared by the sweep, the metrics and the alerts.

Waiting is not being stuck. A live operation is in one of these states, told apart by two
stamps on its row, both from the database's clock (the one clock every host shares):

- **running**: a network stage (load, sync, rollback) stamped ``attempt_started_at`` when it
  began and clears it when it ends (a move, a scheduled retry, a failure);
- **dead**: that stamp is older than ``stuck_after_s``, which the settings keep above the hard
  time limit plus the microservice deadline: the attempt can no longer be running, its worker
  died. Re-driving it counts as an attempt of the stage (so a stage that kills its worker
  every time ends FAILED);
- **waiting**: its message was published (``dispatched_at``) and has not started. It may sit
  behind a backlog of any age: that spends no retry budget and never fails anything;
- **lost**: waiting, but the queue has moved past it. The sweep sends a *probe* through the
  pipeline queue (:class:`~stock_sync.adapters.models.QueueProbe`); the queue is FIFO, so once
  a worker has run a probe, every message published before the probe has been taken from the
  queue. A message taken from the queue starts within the hard time limit (the longest a
  worker can keep it while its pool is busy), so an operation dispatched before a probe that
  ran more than that long ago, and still not started, lost its message. Re-driving it costs
  no retry: the stage never ran;
- **planned**: a retry of the stage is due at ``next_retry_at`` (a countdown message held by a
  worker, or, for long waits, no message at all: the row is *parked* and beat re-enqueues it
  when due). A planned retry is lost only once it is overdue by the hard time limit.

The sweep re-drives lost and dead operations (see :mod:`stock_sync.services.sweeps`); the
metrics and the alerts count them as stuck. Both predicates lead with ``status`` so PostgreSQL
answers them from the (status, dispatched_at) and (status, attempt_started_at) indexes: their
cost is the number of live rows, never the finished ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Connection, and_, false, func, or_, select

from stock_sync.adapters.models import PendingStockOperation, QueueProbe, read_database_now
from stock_sync.adapters.settings import Settings
from stock_sync.domain.statuses import ACTIVE_STATUSES

LIVE_STATUS_VALUES = sorted(status.value for status in ACTIVE_STATUSES)


@dataclass(frozen=True)
class StuckWindow:
    """Everything the stuck predicates compare with, read once per sweep or metrics pass.

    ``frontier``: the newest probe that a worker ran at least ``grace_s`` ago was published
    then; None while no probe has come through yet (nothing can be proven lost)."""

    now: datetime
    stuck_after_s: float
    grace_s: float
    frontier: datetime | None

    @property
    def threshold(self) -> datetime:
        return self.now - timedelta(seconds=self.stuck_after_s)

    @property
    def overdue_before(self) -> datetime:
        return self.now - timedelta(seconds=self.grace_s)


def stuck_window(
    connection: Connection, settings: Settings, *, now: datetime | None = None
) -> StuckWindow:
    """The window at ``now`` (default: the database's clock), with the pipeline queue's
    frontier read from the probes."""
    now = now or read_database_now(connection)
    grace_s = settings.task_time_limit_s
    frontier = connection.execute(
        select(func.max(QueueProbe.dispatched_at)).where(
            QueueProbe.queue == settings.queue_name,
            QueueProbe.consumed_at.is_not(None),
            QueueProbe.consumed_at <= now - timedelta(seconds=grace_s),
        )
    ).scalar()
    return StuckWindow(now, settings.stuck_after_s, grace_s, frontier)


def is_lost(window: StuckWindow) -> ColumnElement[bool]:
    """SQL: live, its message published before the stuck threshold and before the frontier,
    never started, and no retry planned (or one overdue past the grace)."""
    if window.frontier is None:
        return false()
    op = PendingStockOperation
    return and_(
        op.status.in_(LIVE_STATUS_VALUES),
        op.dispatched_at < min(window.threshold, window.frontier),
        op.attempt_started_at.is_(None),
        or_(op.next_retry_at.is_(None), op.next_retry_at < window.overdue_before),
    )


def is_dead(window: StuckWindow) -> ColumnElement[bool]:
    """SQL: live, with an attempt that started before the stuck threshold and never ended."""
    op = PendingStockOperation
    return and_(
        op.status.in_(LIVE_STATUS_VALUES),
        op.attempt_started_at < window.threshold,
    )


def is_stuck(window: StuckWindow) -> ColumnElement[bool]:
    """SQL condition selecting stuck (lost or dead) operations."""
    return or_(is_lost(window), is_dead(window))


def is_waiting(window: StuckWindow) -> ColumnElement[bool]:
    """SQL: live, its message published and not started, and not (yet) proven lost: an
    operation waiting its turn in the queue."""
    op = PendingStockOperation
    return and_(
        op.status.in_(LIVE_STATUS_VALUES),
        op.dispatched_at.is_not(None),
        op.attempt_started_at.is_(None),
        ~is_lost(window),
    )

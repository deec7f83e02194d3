"""The seed's four alerts (stuck operations, a high error rate, slow processing, frequent
cancellations) and failed microservice rollbacks.

:func:`evaluate_alerts` is a pure function of a :class:`MetricsSnapshot` and the settings;
:func:`run_alert_check` collects the metrics, evaluates the rules and hands what it saw to the
alert state (:mod:`stock_sync.services.alert_notices`), which notifies when a rule starts firing,
again every ``STOCK_SYNC_ALERT_REPEAT_S`` while it fires, and when it clears.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from stock_sync.adapters.db import Database
from stock_sync.adapters.probes import queue_length
from stock_sync.adapters.settings import Settings
from stock_sync.services.alert_notices import ALERTS_LOGGER, Notice, update_alert_states
from stock_sync.services.metrics import MetricsSnapshot, read_metrics

__all__ = ["ALERTS_LOGGER", "RULES", "Alert", "AlertCheck", "evaluate_alerts", "run_alert_check"]

STUCK_OPERATIONS = "stuck_operations"
HIGH_ERROR_RATE = "high_error_rate"
PROCESSING_TIME_EXCEEDED = "processing_time_exceeded"
FREQUENT_CANCELLATIONS = "frequent_cancellations"
# Beyond the seed's four: a rollback that gave up leaves the marketplace wrong until a human acts.
FAILED_ROLLBACKS = "failed_rollbacks"
# Raised by the daily reconciliation (tasks.maintenance), through the same alert state.
RECONCILIATION_MISMATCH = "reconciliation_mismatch"
RULES = (
    STUCK_OPERATIONS,
    HIGH_ERROR_RATE,
    PROCESSING_TIME_EXCEEDED,
    FREQUENT_CANCELLATIONS,
    FAILED_ROLLBACKS,
)


@dataclass(frozen=True)
class Alert:
    """One broken rule: its measured ``value`` against ``threshold`` over ``window_s`` seconds,
    with a few operations to look at first."""

    rule: str
    value: float
    threshold: float
    window_s: float
    sample_operation_ids: list[str]
    message: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON the log record carries and the webhook receives."""
        return asdict(self)  # the fields in order, the id list a copy


# --- the rules ------------------------------------------------------------------------------


def _alert(
    rule: str, snapshot: MetricsSnapshot, measured: tuple[float, float], ids: Sequence[str]
) -> Callable[[str], Alert]:
    """The alert ``rule`` breaks, its (value, threshold) ``measured`` over the snapshot's
    window, with its sample operation ids: given the rule's own message, the :class:`Alert`."""
    value, threshold = measured
    return lambda message: Alert(rule, value, threshold, snapshot.window_s, list(ids), message)


def stuck_operations(snapshot: MetricsSnapshot, settings: Settings) -> Alert | None:
    """Fires when at least ``alert_stuck_threshold`` operations are stuck."""
    stuck, threshold = snapshot.stuck_count, settings.alert_stuck_threshold
    if stuck < threshold:
        return None
    alert = _alert(STUCK_OPERATIONS, snapshot, (stuck, threshold), snapshot.stuck_sample_ids)
    over = f"{settings.stuck_after_s:g}s"
    return alert(f"{stuck} operation(s) made no progress for over {over} (threshold {threshold})")


def high_error_rate(snapshot: MetricsSnapshot, settings: Settings) -> Alert | None:
    """Fires when failed / settled order deductions in the window reaches the threshold, once
    at least ``alert_min_operations`` settled (stock_sync/domain/settlement.py: the definition
    docker/prometheus-alerts.yml's StockSyncHighErrorRate applies to the same counters)."""
    settled, ratio = snapshot.settled, snapshot.error_ratio
    threshold = settings.alert_error_rate_threshold
    if settled < settings.alert_min_operations or ratio < threshold:
        return None
    alert = _alert(HIGH_ERROR_RATE, snapshot, (ratio, threshold), snapshot.failed_sample_ids)
    return alert(
        f"{ratio:.0%} of {settled} settled order deductions failed in the "
        f"last {snapshot.window_s:g}s (threshold {threshold:.0%})"
    )


def processing_time_exceeded(snapshot: MetricsSnapshot, settings: Settings) -> Alert | None:
    """Fires when the p95 processing time is above the threshold."""
    threshold, p95 = settings.alert_processing_time_threshold_s, snapshot.processing_seconds_p95
    if p95 <= threshold:
        return None
    slowest = snapshot.slowest_operation_ids
    window = f"{snapshot.window_s:g}s"
    alert = _alert(PROCESSING_TIME_EXCEEDED, snapshot, (p95, threshold), slowest)
    return alert(f"p95 processing time {p95:.1f}s over the last {window} exceeds {threshold:g}s")


def frequent_cancellations(snapshot: MetricsSnapshot, settings: Settings) -> Alert | None:
    """Fires when cancelled / created reaches the threshold, once enough were created."""
    threshold = settings.alert_cancellation_rate_threshold
    created, ratio = snapshot.created_in_window, snapshot.cancellation_ratio
    if created < settings.alert_min_operations or ratio < threshold:
        return None
    cancelled = snapshot.cancelled_sample_ids
    return _alert(FREQUENT_CANCELLATIONS, snapshot, (ratio, threshold), cancelled)(
        f"{snapshot.cancellations} cancellation(s) against {created} order deductions "
        f"created in the last {snapshot.window_s:g}s ({ratio:.0%}, threshold {threshold:.0%})"
    )


def failed_rollbacks(snapshot: MetricsSnapshot, settings: Settings) -> Alert | None:
    """Fires while any microservice rollback is FAILED and not yet retried with success
    (counted by state, not by window: it stays wrong until someone acts)."""
    if snapshot.failed_rollbacks < 1:
        return None
    alert = _alert(
        FAILED_ROLLBACKS, snapshot, (snapshot.failed_rollbacks, 1), snapshot.failed_rollback_ids
    )
    return alert(
        f"{snapshot.failed_rollbacks} microservice rollback(s) of cancelled operations "
        "gave up: their fulfillment status was not put back (see `stock-sync show` of "
        "each; `stock-sync rollback retry OP_ID` runs one again)"
    )


Rule = Callable[[MetricsSnapshot, Settings], Alert | None]
ALL_RULES: Sequence[Rule] = (
    stuck_operations,
    high_error_rate,
    processing_time_exceeded,
    frequent_cancellations,
    failed_rollbacks,
)


def evaluate_alerts(snapshot: MetricsSnapshot, settings: Settings) -> list[Alert]:
    """The alerts ``snapshot`` breaks, in :data:`RULES` order. Pure: no I/O."""
    return [alert for rule in ALL_RULES if (alert := rule(snapshot, settings)) is not None]


# --- the check ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertCheck:
    """What one check saw: the alerts firing, the notices it made, the queue length."""

    alerts: list[Alert]
    notices: list[Notice]
    queue_length: int | None

    def summary(self) -> dict[str, Any]:
        """For the maintenance run record."""
        return {
            "fired": [alert.rule for alert in self.alerts],
            "notices": [f"{notice.rule}:{notice.kind.value}" for notice in self.notices],
            "queue_length": self.queue_length,
        }


def run_alert_check(
    database: Database,
    settings: Settings,
    *,
    now: datetime,
    webhook_url: str,
    app: Any = None,
) -> AlertCheck:
    """Collect the metrics at ``now``, evaluate the rules and update the alert state, which
    logs and POSTs the notices due.

    The broker is asked before and the webhook called after the database transactions, so no
    network call happens inside one.
    """
    queue = queue_length(app, settings.queue_name) if app is not None else None
    snapshot = read_metrics(database, settings, now=now, queue_length=queue)
    alerts = evaluate_alerts(snapshot, settings)
    firing = {alert.rule: alert.to_dict() for alert in alerts}
    observed = {rule: firing.get(rule) for rule in RULES}
    notices = update_alert_states(database, settings, observed, now=now, webhook_url=webhook_url)
    return AlertCheck(alerts, notices, queue)

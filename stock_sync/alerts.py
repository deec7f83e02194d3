"""The seed's four alerts: stuck operations, a high error rate, slow processing, frequent
cancellations.

:func:`evaluate_alerts` is a pure function of a :class:`MetricsSnapshot` and the settings;
:func:`publish_alerts` logs each alert (and POSTs it to a webhook when one is configured);
:func:`run_alert_check` glues them for the beat task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import requests

from stock_sync.db import Database
from stock_sync.metrics import MetricsSnapshot, queue_length, read_metrics
from stock_sync.redaction import redact, redact_url, url_secrets
from stock_sync.settings import Settings

ALERTS_LOGGER = "stock_sync.alerts"
WEBHOOK_TIMEOUT_S = 5.0

STUCK_OPERATIONS = "stuck_operations"
HIGH_ERROR_RATE = "high_error_rate"
PROCESSING_TIME_EXCEEDED = "processing_time_exceeded"
FREQUENT_CANCELLATIONS = "frequent_cancellations"
# Beyond the seed's four: a rollback that gave up leaves the marketplace wrong until a human acts.
FAILED_ROLLBACKS = "failed_rollbacks"
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
        return {
            "rule": self.rule,
            "value": self.value,
            "threshold": self.threshold,
            "window_s": self.window_s,
            "sample_operation_ids": list(self.sample_operation_ids),
            "message": self.message,
        }


# --- the rules ------------------------------------------------------------------------------


def stuck_operations(snapshot: MetricsSnapshot, settings: Settings) -> Alert | None:
    """Fires when at least ``alert_stuck_threshold`` operations are stuck."""
    if snapshot.stuck_count < settings.alert_stuck_threshold:
        return None
    return Alert(
        rule=STUCK_OPERATIONS,
        value=snapshot.stuck_count,
        threshold=settings.alert_stuck_threshold,
        window_s=snapshot.window_s,
        sample_operation_ids=list(snapshot.stuck_sample_ids),
        message=(
            f"{snapshot.stuck_count} operation(s) made no progress for over "
            f"{settings.stuck_after_s:g}s (threshold {settings.alert_stuck_threshold})"
        ),
    )


def high_error_rate(snapshot: MetricsSnapshot, settings: Settings) -> Alert | None:
    """Fires when failed / (completed + failed) reaches the threshold, once enough finished."""
    finished = snapshot.completed_or_failed
    threshold = settings.alert_error_rate_threshold
    if finished < settings.alert_min_operations or snapshot.error_ratio < threshold:
        return None
    return Alert(
        rule=HIGH_ERROR_RATE,
        value=snapshot.error_ratio,
        threshold=threshold,
        window_s=snapshot.window_s,
        sample_operation_ids=list(snapshot.failed_sample_ids),
        message=(
            f"{snapshot.error_ratio:.0%} of {finished} finished order deductions failed in the "
            f"last {snapshot.window_s:g}s (threshold {threshold:.0%})"
        ),
    )


def processing_time_exceeded(snapshot: MetricsSnapshot, settings: Settings) -> Alert | None:
    """Fires when the p95 processing time is above the threshold."""
    threshold = settings.alert_processing_time_threshold_s
    if snapshot.processing_seconds_p95 <= threshold:
        return None
    return Alert(
        rule=PROCESSING_TIME_EXCEEDED,
        value=snapshot.processing_seconds_p95,
        threshold=threshold,
        window_s=snapshot.window_s,
        sample_operation_ids=list(snapshot.slowest_operation_ids),
        message=(
            f"p95 processing time {snapshot.processing_seconds_p95:.1f}s over the last "
            f"{snapshot.window_s:g}s exceeds {threshold:g}s"
        ),
    )


def frequent_cancellations(snapshot: MetricsSnapshot, settings: Settings) -> Alert | None:
    """Fires when cancelled / created reaches the threshold, once enough were created."""
    threshold = settings.alert_cancellation_rate_threshold
    created = snapshot.created_in_window
    if created < settings.alert_min_operations or snapshot.cancellation_ratio < threshold:
        return None
    return Alert(
        rule=FREQUENT_CANCELLATIONS,
        value=snapshot.cancellation_ratio,
        threshold=threshold,
        window_s=snapshot.window_s,
        sample_operation_ids=list(snapshot.cancelled_sample_ids),
        message=(
            f"{snapshot.cancellations} cancellation(s) against {created} order deductions "
            f"created in the last {snapshot.window_s:g}s "
            f"({snapshot.cancellation_ratio:.0%}, threshold {threshold:.0%})"
        ),
    )


def failed_rollbacks(snapshot: MetricsSnapshot, settings: Settings) -> Alert | None:
    """Fires on any microservice rollback that ended FAILED within the window."""
    if snapshot.failed_rollbacks < 1:
        return None
    return Alert(
        rule=FAILED_ROLLBACKS,
        value=snapshot.failed_rollbacks,
        threshold=1,
        window_s=snapshot.window_s,
        sample_operation_ids=list(snapshot.failed_rollback_ids),
        message=(
            f"{snapshot.failed_rollbacks} microservice rollback(s) of cancelled operations "
            f"gave up in the last {snapshot.window_s:g}s: their fulfillment status was not "
            "put back (see `stock-sync show` of each)"
        ),
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


# --- publishing -----------------------------------------------------------------------------


def _post(
    alert: Alert, webhook_url: str, session: requests.Session, logger: logging.Logger
) -> None:
    failure = {"action": "alert_webhook_failed", "rule": alert.rule}
    # Webhook URLs carry their secret token in the path or query, and requests quotes the URL
    # in its errors in its own encoding: show only the host, mask the rest in any encoding.
    where = redact_url(webhook_url, path_is_secret=True)
    try:
        response = session.post(webhook_url, json=alert.to_dict(), timeout=WEBHOOK_TIMEOUT_S)
    except requests.RequestException as error:
        logger.error(
            "alert webhook at %s failed: %s",
            where,
            redact(str(error), url_secrets(webhook_url, path_is_secret=True)),
            extra={**failure, "error_type": type(error).__name__},
        )
        return
    if not response.ok:
        logger.error(
            "alert webhook at %s answered HTTP %s",
            where,
            response.status_code,
            extra={**failure, "http_status": response.status_code},
        )


def publish_alerts(
    alerts: Iterable[Alert],
    *,
    webhook_url: str,
    session: requests.Session | None = None,
    logger: logging.Logger | None = None,
) -> None:
    """Log one WARNING record per alert (action="alert" plus the alert's fields) and POST its
    JSON to ``webhook_url`` when set. A failing webhook is logged at ERROR; never raises."""
    logger = logger or logging.getLogger(ALERTS_LOGGER)
    http = session or requests.Session()
    try:
        for alert in alerts:
            fields = alert.to_dict()
            message = fields.pop("message")
            logger.warning("ALERT %s: %s", alert.rule, message, extra={"action": "alert", **fields})
            if webhook_url:
                _post(alert, webhook_url, http, logger)
    finally:
        if session is None:
            http.close()


def run_alert_check(
    database: Database,
    settings: Settings,
    *,
    now: datetime,
    webhook_url: str,
    app: Any = None,
) -> list[Alert]:
    """Collect the metrics at ``now``, evaluate the rules and publish what fires.

    The broker is asked before and the webhook called after the database transaction, so no
    network call happens inside it. Returns the alerts published.
    """
    queue = queue_length(app, settings.queue_name) if app is not None else None
    snapshot = read_metrics(database, settings, now=now, queue_length=queue)
    alerts = evaluate_alerts(snapshot, settings)
    publish_alerts(alerts, webhook_url=webhook_url)
    return alerts

"""Alert state kept in the database, and the notices it owes.

Each rule's row in ``alert_states`` says whether it fires, since when, and which notice is
still owed, so every beat host agrees and a restart re-sends nothing. An evaluation compares
what it observed with the rows and makes a notice when a rule starts firing (``firing``),
every ``STOCK_SYNC_ALERT_REPEAT_S`` while it fires (``repeat``) and when it clears
(``resolved``).

Evaluations take turns on a transaction-scoped advisory lock (on SQLite, BEGIN IMMEDIATE
serialises them already), so two beat hosts never make the same notice. Notices are logged and
POSTed after the transaction commits: no HTTP call inside a transaction, and no notice for a
change that rolled back. A notice counts as delivered only once the webhook accepted it; until
then it stays owed in its row and the next evaluation POSTs it again, with the same
``notice_id`` (a receiver can tell a retry from a new notice). The host about to POST claims
the notice for ``DELIVERY_LEASE_S``, so an evaluation on another host meanwhile leaves it alone.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

import requests
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import AlertState
from stock_sync.adapters.redaction import redact, redact_url, url_secrets
from stock_sync.adapters.settings import Settings

ALERTS_LOGGER = "stock_sync.alerts"
WEBHOOK_TIMEOUT_S = 5.0
# Longer than a POST can take (connect + read timeouts, with room): a host that died while
# POSTing leaves its claim to expire, and the next evaluation delivers the notice.
DELIVERY_LEASE_S = 30.0
# Any constant works; it only has to be the same for every evaluator of one database.
ALERT_STATE_LOCK_KEY = 0x5707_A1E7

# What a rule observed: the alert's fields (value, threshold, window_s, sample_operation_ids,
# message) when it fires, None when it does not.
Observation = Mapping[str, Any] | None


class NoticeKind(str, Enum):
    FIRING = "firing"
    REPEAT = "repeat"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class Notice:
    """One notice, ``body`` exactly as it is logged and POSTed."""

    body: dict[str, Any]

    @property
    def rule(self) -> str:
        return str(self.body["rule"])

    @property
    def kind(self) -> NoticeKind:
        return NoticeKind(self.body["notice"])

    @property
    def notice_id(self) -> str:
        return str(self.body["notice_id"])


def notice_due(
    *,
    was_firing: bool,
    fires: bool,
    owed: bool,
    last_notified_at: datetime | None,
    now: datetime,
    repeat_s: float,
) -> NoticeKind | None:
    """The notice a rule owes after this observation, if any. Pure."""
    if fires and not was_firing:
        return NoticeKind.FIRING
    if not fires:
        return NoticeKind.RESOLVED if was_firing else None
    if owed:
        return None  # the notice not yet delivered goes out first; repeats count from it
    if last_notified_at is None or (now - last_notified_at).total_seconds() >= repeat_s:
        return NoticeKind.REPEAT
    return None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def notice_body(kind: NoticeKind, state: AlertState, now: datetime) -> dict[str, Any]:
    """The notice's JSON. A resolved notice carries the alert as it was last seen firing."""
    details = {key: value for key, value in (state.details or {}).items() if key != "rule"}
    message = str(details.pop("message", ""))
    if kind is NoticeKind.RESOLVED:
        message = (
            f"resolved: {state.rule} no longer fires (firing since {_iso(state.firing_since)}, "
            f"last value {details.get('value')}, threshold {details.get('threshold')})"
        )
    return {
        "notice_id": str(uuid.uuid4()),
        "notice": kind.value,
        "rule": state.rule,
        "firing": kind is not NoticeKind.RESOLVED,
        **details,
        "message": message,
        "firing_since": _iso(state.firing_since),
        "resolved_at": _iso(state.resolved_at),
        "at": _iso(now),
    }


# --- one evaluation -------------------------------------------------------------------------


def update_alert_states(
    database: Database,
    settings: Settings,
    observed: Mapping[str, Observation],
    *,
    now: datetime,
    webhook_url: str,
    http: requests.Session | None = None,
    logger: logging.Logger | None = None,
) -> list[Notice]:
    """Apply what was ``observed`` (rule -> its alert's fields, or None) to the stored states,
    log the notices this makes, then deliver every owed notice to the webhook.

    Rules missing from ``observed`` keep their state (one that fires may be due a repeat).
    Returns the notices made by this evaluation, not the ones it only retried.
    """
    log = logger or logging.getLogger(ALERTS_LOGGER)
    with database.transaction() as session:
        _take_turns(session)
        states = {state.rule: state for state in session.scalars(select(AlertState))}
        made = _observe_all(session, states, observed, now, settings, webhook=bool(webhook_url))
        claimed = _claim_owed(states.values(), now) if webhook_url else _forget_owed(states)
    for notice in made:
        _log_notice(notice, log)
    if claimed:
        results = _deliver(claimed, webhook_url, http, log)
        _record_deliveries(database, results, now, log)
    return made


def _take_turns(session: Session) -> None:
    """Serialise the evaluations of every host until this transaction ends."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("select pg_advisory_xact_lock(:key)"), {"key": ALERT_STATE_LOCK_KEY})


def _observe_all(
    session: Session,
    states: dict[str, AlertState],
    observed: Mapping[str, Observation],
    now: datetime,
    settings: Settings,
    *,
    webhook: bool,
) -> list[Notice]:
    # A rule this evaluation did not observe (the daily reconciliation's, seen from the
    # alert check) is taken to be as it was last seen: it can be due a repeat, not a change.
    unobserved = {
        rule: state.details
        for rule, state in states.items()
        if state.firing and rule not in observed
    }
    notices = []
    for rule, alert in {**observed, **unobserved}.items():
        notice = _observe(session, states, rule, alert, now, settings)
        if notice is not None:
            _owe(states[rule], notice, now, webhook=webhook)
            notices.append(notice)
    return notices


def _observe(
    session: Session,
    states: dict[str, AlertState],
    rule: str,
    alert: Observation,
    now: datetime,
    settings: Settings,
) -> Notice | None:
    """Move one rule's state to what was observed; the notice this makes, if any."""
    state = states.get(rule)
    fires = alert is not None
    if state is None:
        if not fires:
            return None  # a rule gets a row the first time it fires
        state = states[rule] = AlertState(
            rule=rule, firing=False, firing_since=now, last_evaluated_at=now, delivery_attempts=0
        )
        session.add(state)
    kind = notice_due(
        was_firing=state.firing,
        fires=fires,
        owed=state.pending_notice is not None,
        last_notified_at=state.last_notified_at,
        now=now,
        repeat_s=settings.alert_repeat_s,
    )
    if fires and not state.firing:
        state.firing_since, state.resolved_at = now, None
    elif state.firing and not fires:
        state.resolved_at = now
    state.firing, state.last_evaluated_at = fires, now
    if alert is not None:
        state.details, state.last_value = dict(alert), alert.get("value")
    return Notice(notice_body(kind, state, now)) if kind is not None else None


def _owe(state: AlertState, notice: Notice, now: datetime, *, webhook: bool) -> None:
    """Without a webhook the log record is the delivery; with one the notice is owed until
    the webhook accepts it (it replaces an older notice still owed: the newest state wins)."""
    if webhook:
        state.pending_notice, state.delivery_attempts, state.delivering_until = notice.body, 0, None
    else:
        state.pending_notice, state.last_notified_at = None, now


def _claim_owed(states: Iterable[AlertState], now: datetime) -> list[Notice]:
    """The owed notices no other host is delivering, claimed for DELIVERY_LEASE_S."""
    claimed = []
    for state in states:
        if state.pending_notice is None:
            continue
        if state.delivering_until is not None and state.delivering_until > now:
            continue
        state.delivering_until = now + timedelta(seconds=DELIVERY_LEASE_S)
        claimed.append(Notice(dict(state.pending_notice)))
    return claimed


def _forget_owed(states: Mapping[str, AlertState]) -> list[Notice]:
    """The webhook was unset since these notices were made: nothing is left to deliver to."""
    for state in states.values():
        state.pending_notice, state.delivering_until = None, None
    return []


# --- delivery -------------------------------------------------------------------------------


def _log_notice(notice: Notice, logger: logging.Logger) -> None:
    """One record per notice: WARNING ``action=alert`` while firing, INFO ``alert_resolved``."""
    fields = dict(notice.body)
    message = fields.pop("message")
    if notice.kind is NoticeKind.RESOLVED:
        logger.info(
            "RESOLVED %s: %s", notice.rule, message, extra={"action": "alert_resolved", **fields}
        )
    else:
        logger.warning("ALERT %s: %s", notice.rule, message, extra={"action": "alert", **fields})


def _deliver(
    notices: list[Notice],
    webhook_url: str,
    http: requests.Session | None,
    logger: logging.Logger,
) -> list[tuple[Notice, bool]]:
    session = http or requests.Session()
    try:
        return [(notice, post_notice(notice, webhook_url, session, logger)) for notice in notices]
    finally:
        if http is None:
            session.close()


def post_notice(
    notice: Notice, webhook_url: str, session: requests.Session, logger: logging.Logger
) -> bool:
    """POST the notice; True when the webhook accepted it (2xx). A failure is logged at ERROR
    (``action=alert_webhook_failed``) and never raised."""
    failure = {"action": "alert_webhook_failed", "rule": notice.rule, "notice_id": notice.notice_id}
    # Webhook URLs carry their secret token in the path or query, and requests quotes the URL
    # in its errors in its own encoding: show only the host, mask the rest in any encoding.
    where = redact_url(webhook_url, path_is_secret=True)
    try:
        response = session.post(webhook_url, json=notice.body, timeout=WEBHOOK_TIMEOUT_S)
    except requests.RequestException as error:
        logger.error(
            "alert webhook at %s failed: %s",
            where,
            redact(str(error), url_secrets(webhook_url, path_is_secret=True)),
            extra={**failure, "error_type": type(error).__name__},
        )
        return False
    if not response.ok:
        logger.error(
            "alert webhook at %s answered HTTP %s",
            where,
            response.status_code,
            extra={**failure, "http_status": response.status_code},
        )
        return False
    return True


def _record_deliveries(
    database: Database,
    results: list[tuple[Notice, bool]],
    now: datetime,
    logger: logging.Logger,
) -> None:
    """Mark the delivered notices as such; a failed one stays owed, unclaimed, for the next
    evaluation. A notice replaced meanwhile by a newer one leaves the newer one owed."""
    with database.transaction() as session:
        _take_turns(session)
        for notice, delivered in results:
            state = session.get(AlertState, notice.rule)
            if state is None or (state.pending_notice or {}).get("notice_id") != notice.notice_id:
                continue
            state.delivering_until = None
            if not delivered:
                state.delivery_attempts += 1
                continue
            if state.delivery_attempts:
                logger.info(
                    "alert notice %s of %s delivered after %d failed attempt(s)",
                    notice.kind.value,
                    notice.rule,
                    state.delivery_attempts,
                    extra={"action": "alert_delivered", "notice_id": notice.notice_id},
                )
            state.pending_notice, state.delivery_attempts, state.last_notified_at = None, 0, now

"""The four alert rules, their log records and their webhook: pure rules on built snapshots,
then the whole check against PostgreSQL and a real HTTP webhook."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from stock_sync.alerts import (
    ALERTS_LOGGER,
    FAILED_ROLLBACKS,
    FREQUENT_CANCELLATIONS,
    HIGH_ERROR_RATE,
    PROCESSING_TIME_EXCEEDED,
    RULES,
    STUCK_OPERATIONS,
    Alert,
    evaluate_alerts,
    publish_alerts,
    run_alert_check,
)
from stock_sync.db import Database
from stock_sync.logging_setup import json_formatter
from stock_sync.metrics import MetricsSnapshot
from stock_sync.settings import Settings
from tests.support import insert_operation

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
WINDOW_S = 3600.0
SETTINGS = Settings(
    alert_window_s=WINDOW_S,
    stuck_after_s=900,
    alert_stuck_threshold=2,
    alert_error_rate_threshold=0.25,
    alert_processing_time_threshold_s=60,
    alert_cancellation_rate_threshold=0.1,
    alert_min_operations=10,
)


def snapshot(**figures: Any) -> MetricsSnapshot:
    return MetricsSnapshot(generated_at=NOW, window_s=WINDOW_S, **figures)


# Below every threshold: 1 stuck (< 2), 1/21 failed, p95 30 s, 1/30 cancelled.
HEALTHY = snapshot(
    finished_by_status={"completed": 20, "failed": 1, "cancelled": 1},
    created_in_window=30,
    completed_timed=20,
    processing_seconds_avg=20.0,
    processing_seconds_p95=30.0,
    slowest_operation_ids=("slow-1",),
    failed_sample_ids=("failed-1",),
    cancelled_sample_ids=("cancelled-1",),
    stuck_count=1,
    stuck_sample_ids=("stuck-1",),
)


def fired(snapshot: MetricsSnapshot) -> list[str]:
    return [alert.rule for alert in evaluate_alerts(snapshot, SETTINGS)]


# --- the rules (pure) ---------------------------------------------------------------------------


def test_a_healthy_snapshot_raises_nothing() -> None:
    assert evaluate_alerts(HEALTHY, SETTINGS) == []


@pytest.mark.parametrize(
    ("broken", "rule", "value", "threshold", "samples"),
    [
        pytest.param(
            replace(HEALTHY, stuck_count=2, stuck_sample_ids=("stuck-1", "stuck-2")),
            STUCK_OPERATIONS,
            2,
            2,
            ["stuck-1", "stuck-2"],
            id="stuck count at the threshold",
        ),
        pytest.param(
            replace(HEALTHY, finished_by_status={"completed": 15, "failed": 5}),
            HIGH_ERROR_RATE,
            0.25,
            0.25,
            ["failed-1"],
            id="error ratio at the threshold with 20 finished",
        ),
        pytest.param(
            replace(HEALTHY, processing_seconds_p95=60.5),
            PROCESSING_TIME_EXCEEDED,
            60.5,
            60,
            ["slow-1"],
            id="p95 above the threshold",
        ),
        pytest.param(
            replace(HEALTHY, created_in_window=10, finished_by_status={"cancelled": 1}),
            FREQUENT_CANCELLATIONS,
            0.1,
            0.1,
            ["cancelled-1"],
            id="cancellation ratio at the threshold with 10 created",
        ),
    ],
)
def test_each_rule_fires_on_data_that_breaks_it(
    broken: MetricsSnapshot, rule: str, value: float, threshold: float, samples: list[str]
) -> None:
    (alert,) = evaluate_alerts(broken, SETTINGS)

    assert alert.rule == rule
    assert alert.value == pytest.approx(value)
    assert alert.threshold == threshold
    assert alert.window_s == WINDOW_S
    assert alert.sample_operation_ids == samples
    assert alert.message


@pytest.mark.parametrize(
    "quiet",
    [
        pytest.param(replace(HEALTHY, stuck_count=1), id="stuck count below the threshold"),
        pytest.param(
            replace(HEALTHY, finished_by_status={"completed": 19, "failed": 6}),
            id="error ratio 0.24 just below 0.25",
        ),
        pytest.param(
            replace(HEALTHY, finished_by_status={"completed": 4, "failed": 5}),
            id="error ratio 0.56 but only 9 finished",
        ),
        pytest.param(replace(HEALTHY, processing_seconds_p95=60.0), id="p95 equal to the limit"),
        pytest.param(
            replace(HEALTHY, created_in_window=100, finished_by_status={"cancelled": 9}),
            id="cancellation ratio 0.09 just below 0.1",
        ),
        pytest.param(
            replace(HEALTHY, created_in_window=9, finished_by_status={"cancelled": 5}),
            id="cancellation ratio 0.56 but only 9 created",
        ),
    ],
)
def test_rules_stay_quiet_on_data_that_does_not_break_them(quiet: MetricsSnapshot) -> None:
    assert fired(quiet) == []


def test_every_broken_rule_fires_in_rule_order() -> None:
    everything_wrong = replace(
        HEALTHY,
        stuck_count=5,
        finished_by_status={"completed": 5, "failed": 5, "cancelled": 10},
        created_in_window=20,
        processing_seconds_p95=600.0,
        failed_rollbacks=1,
        failed_rollback_ids=("rollback-1",),
    )

    assert fired(everything_wrong) == list(RULES)


# --- publishing ---------------------------------------------------------------------------------


def an_alert(rule: str = STUCK_OPERATIONS) -> Alert:
    return Alert(
        rule=rule,
        value=3,
        threshold=1,
        window_s=WINDOW_S,
        sample_operation_ids=["op-1", "op-2"],
        message=f"{rule} broke",
    )


def alert_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ALERTS_LOGGER and r.levelno == level]


def test_publish_writes_one_alert_record_per_alert(caplog: pytest.LogCaptureFixture) -> None:
    alerts = [an_alert(STUCK_OPERATIONS), an_alert(HIGH_ERROR_RATE)]

    with caplog.at_level(logging.WARNING, logger=ALERTS_LOGGER):
        publish_alerts(alerts, webhook_url="")

    records = alert_records(caplog, logging.WARNING)
    assert [record.rule for record in records] == [STUCK_OPERATIONS, HIGH_ERROR_RATE]  # type: ignore[attr-defined]
    line = json.loads(json_formatter().format(records[0]))
    assert line["level"] == "WARNING" and line["logger"] == ALERTS_LOGGER
    assert {key: line[key] for key in ("action", "rule", "value", "threshold", "window_s")} == {
        "action": "alert",
        "rule": STUCK_OPERATIONS,
        "value": 3,
        "threshold": 1,
        "window_s": WINDOW_S,
    }
    assert line["sample_operation_ids"] == ["op-1", "op-2"]
    assert "stuck_operations broke" in line["message"]


@dataclass
class Webhook:
    """A real HTTP endpoint on 127.0.0.1 that records what is POSTed to it."""

    url: str
    answer_status: int = 204
    bodies: list[Any] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    recorder: Webhook

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            recorder.bodies.append(json.loads(self.rfile.read(length)))
            recorder.content_types.append(self.headers["Content-Type"])
            self.send_response(recorder.answer_status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    recorder = Webhook(url=f"http://127.0.0.1:{server.server_port}/hooks/secret-token")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield recorder
    server.shutdown()
    server.server_close()
    thread.join()


def test_the_webhook_receives_the_same_json(webhook: Webhook) -> None:
    alerts = [an_alert(STUCK_OPERATIONS), an_alert(PROCESSING_TIME_EXCEEDED)]

    publish_alerts(alerts, webhook_url=webhook.url)

    assert webhook.bodies == [alert.to_dict() for alert in alerts]
    assert all(kind == "application/json" for kind in webhook.content_types)


def test_a_webhook_answering_500_is_logged_and_does_not_raise(
    webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    webhook.answer_status = 500

    with caplog.at_level(logging.WARNING, logger=ALERTS_LOGGER):
        publish_alerts([an_alert()], webhook_url=webhook.url)

    assert len(webhook.bodies) == 1
    assert len(alert_records(caplog, logging.WARNING)) == 1
    (error,) = alert_records(caplog, logging.ERROR)
    assert error.action == "alert_webhook_failed" and error.http_status == 500  # type: ignore[attr-defined]
    assert "500" in error.getMessage() and "secret-token" not in error.getMessage()


def refused_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/hooks/secret-token"  # nothing listens there any more


def test_a_webhook_refusing_connections_is_logged_and_does_not_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger=ALERTS_LOGGER):
        publish_alerts([an_alert(), an_alert(HIGH_ERROR_RATE)], webhook_url=refused_url())

    assert len(alert_records(caplog, logging.WARNING)) == 2
    errors = alert_records(caplog, logging.ERROR)
    assert [record.rule for record in errors] == [STUCK_OPERATIONS, HIGH_ERROR_RATE]  # type: ignore[attr-defined]
    assert all("secret-token" not in record.getMessage() for record in errors)


@pytest.mark.parametrize(
    "token_path",
    [
        "/hooks/T0AB%2FB0CD%2FXOXBSECRET",  # a token with %2F-encoded slashes
        "/hooks/T0AB/B0CD/XOXB%20SECRET",  # a character requests leaves quoted
        "/hooks/T0AB/B0CD/XOXB SECRET",  # a raw space requests quotes to %20
        "/hooks?token=XOXB%2FSECRET&channel=ops",  # the token in the query
    ],
)
def test_a_failing_webhook_never_shows_its_token_in_any_encoding(
    caplog: pytest.LogCaptureFixture, token_path: str
) -> None:
    url = refused_url().replace("/hooks/secret-token", token_path)

    with caplog.at_level(logging.WARNING, logger=ALERTS_LOGGER):
        publish_alerts([an_alert()], webhook_url=url)

    (error,) = alert_records(caplog, logging.ERROR)
    shown = json_formatter().format(error) + error.getMessage()
    assert "XOXB" not in shown and "SECRET" not in shown
    assert "alert webhook at http://127.0.0.1:" in error.getMessage()


# --- the whole check against the database -------------------------------------------------------


def add_operation(
    database: Database,
    status: str,
    *,
    created_ago_s: float,
    updated_ago_s: float,
    completed_ago_s: float | None = None,
    now: datetime = NOW,
) -> str:
    completed_at = now - timedelta(seconds=completed_ago_s) if completed_ago_s is not None else None
    operation_id = insert_operation(
        database,
        status=status,
        created_at=now - timedelta(seconds=created_ago_s),
        updated_at=now - timedelta(seconds=updated_ago_s),
        completed_at=completed_at,
    )
    return str(operation_id)


def test_the_check_raises_all_four_alerts_from_the_database(
    clean_database: Database, webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    settings = SETTINGS.model_copy(update={"alert_stuck_threshold": 1, "alert_min_operations": 4})
    stuck = add_operation(clean_database, "processing", created_ago_s=2100, updated_ago_s=2000)
    quick = [
        add_operation(
            clean_database,
            "completed",
            created_ago_s=100 + s,
            updated_ago_s=100,
            completed_ago_s=100,
        )
        for s in (30, 40)
    ]
    slow = add_operation(
        clean_database, "completed", created_ago_s=600, updated_ago_s=100, completed_ago_s=100
    )
    failed = [
        add_operation(clean_database, "failed", created_ago_s=300, updated_ago_s=200 + s)
        for s in (0, 1)
    ]
    cancelled = add_operation(clean_database, "cancelled", created_ago_s=300, updated_ago_s=50)
    gave_up = insert_operation(
        clean_database,
        status="failed",
        operation_type="microservice_rollback",
        created_at=NOW - timedelta(seconds=40),
        updated_at=NOW - timedelta(seconds=30),
    )

    with caplog.at_level(logging.WARNING, logger=ALERTS_LOGGER):
        alerts = run_alert_check(clean_database, settings, now=NOW, webhook_url=webhook.url)

    by_rule = {alert.rule: alert for alert in alerts}
    assert list(by_rule) == list(RULES)
    assert by_rule[STUCK_OPERATIONS].value == 1
    assert by_rule[STUCK_OPERATIONS].sample_operation_ids == [stuck]
    assert by_rule[HIGH_ERROR_RATE].value == pytest.approx(2 / 5)
    assert by_rule[HIGH_ERROR_RATE].sample_operation_ids == failed
    assert by_rule[PROCESSING_TIME_EXCEEDED].value > 60
    assert by_rule[PROCESSING_TIME_EXCEEDED].sample_operation_ids == [slow, *reversed(quick)]
    assert by_rule[FREQUENT_CANCELLATIONS].value == pytest.approx(1 / 7)
    assert by_rule[FREQUENT_CANCELLATIONS].sample_operation_ids == [cancelled]
    assert by_rule[FAILED_ROLLBACKS].value == 1
    assert by_rule[FAILED_ROLLBACKS].sample_operation_ids == [str(gave_up)]
    assert webhook.bodies == [alert.to_dict() for alert in alerts]
    assert [r.rule for r in alert_records(caplog, logging.WARNING)] == list(RULES)  # type: ignore[attr-defined]


def test_the_check_is_quiet_on_a_healthy_database(
    clean_database: Database, webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    settings = SETTINGS.model_copy(update={"alert_min_operations": 4})
    for _ in range(5):
        add_operation(
            clean_database, "completed", created_ago_s=130, updated_ago_s=100, completed_ago_s=100
        )
    add_operation(clean_database, "pending", created_ago_s=10, updated_ago_s=10)

    with caplog.at_level(logging.WARNING, logger=ALERTS_LOGGER):
        alerts = run_alert_check(clean_database, settings, now=NOW, webhook_url=webhook.url)

    assert alerts == []
    assert webhook.bodies == [] and alert_records(caplog, logging.WARNING) == []


def test_the_celery_task_runs_the_check_with_the_configured_settings(
    clean_database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    from tasks.monitoring import evaluate_alerts_task

    # the configured defaults: one operation silent for two hours is enough to alert
    add_operation(
        clean_database, "pending", created_ago_s=7200, updated_ago_s=7200, now=datetime.now(UTC)
    )

    with caplog.at_level(logging.WARNING, logger=ALERTS_LOGGER):
        assert evaluate_alerts_task() == 1

    assert [r.rule for r in alert_records(caplog, logging.WARNING)] == [STUCK_OPERATIONS]  # type: ignore[attr-defined]

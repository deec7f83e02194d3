"""The beat-driven alert check: collect the metrics, evaluate the rules, update the alert state
(which notifies when a rule starts firing, repeats while it fires and says when it clears)."""

from __future__ import annotations

from datetime import UTC, datetime

from stock_sync.adapters.db import get_database
from stock_sync.adapters.maintenance_runs import ALERTS, recorded_run
from stock_sync.adapters.settings import get_settings
from stock_sync.services.alerts import run_alert_check
from tasks.app import app


@app.task(name="stock_sync.evaluate_alerts", ignore_result=True)
def evaluate_alerts_task() -> int:
    """Run one alert check with the configured database, webhook and broker; returns how many
    rules fire (for logs: the result itself is ignored)."""
    settings = get_settings()
    database = get_database(settings)
    with recorded_run(database, ALERTS) as run:
        check = run_alert_check(
            database,
            settings,
            now=datetime.now(UTC),
            webhook_url=settings.alert_webhook_url,
            app=app,
        )
        run.summary = check.summary()
    return len(check.alerts)

"""The beat-driven alert check: collect the metrics, evaluate the four rules, publish."""

from __future__ import annotations

from datetime import UTC, datetime

from stock_sync.alerts import run_alert_check
from stock_sync.db import get_database
from stock_sync.settings import get_settings
from tasks.app import app


@app.task(name="stock_sync.evaluate_alerts", ignore_result=True)
def evaluate_alerts_task() -> int:
    """Run one alert check with the configured database, webhook and broker; returns how many
    alerts fired (for logs: the result itself is ignored)."""
    settings = get_settings()
    alerts = run_alert_check(
        get_database(settings),
        settings,
        now=datetime.now(UTC),
        webhook_url=settings.alert_webhook_url,
        app=app,
    )
    return len(alerts)

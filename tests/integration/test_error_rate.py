"""One error rate (stock_sync/domain/settlement.py) for the in-app alert and the Prometheus rule.

Real operations through the in-process worker, the fake microservice and PostgreSQL: order
deductions that complete, complete and are cancelled later, fail, fail and are retried, or are
cancelled before they settle, with the adjustments the cancellations make. The settled counters
they raise, the in-app alert and docker/prometheus-alerts.yml's rule (run by promtool on the
counter values read from the same database) must agree.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from stock_sync.adapters.settings import Settings
from stock_sync.entrypoints.metrics_exposition import render_prometheus
from stock_sync.producer import request_cancellation, retry_operation, submit_operation
from stock_sync.services.alerts import HIGH_ERROR_RATE, run_alert_check
from stock_sync.services.metrics import read_metrics
from tests.promtool import alert_rules, run_rule_tests
from tests.support import Pipeline, order

# The defaults: fires at 20 % failed once 10 order deductions settled in the hour.
SETTINGS = Settings()


def completed(pipeline: Pipeline, order_id: str) -> uuid.UUID:
    pipeline.fake.add_order(order(order_id, ("SKU-OK", 1)))
    operation_id = submit_operation(order_id)
    assert pipeline.wait_for([operation_id])[0].status == "completed"
    return operation_id


def failed(pipeline: Pipeline, order_id: str, sku: str) -> uuid.UUID:
    """More than ``sku``'s stock: validation spends its budget, FAILED."""
    pipeline.fake.add_order(order(order_id, (sku, 2)))
    operation_id = submit_operation(order_id)
    assert pipeline.wait_for([operation_id])[0].status == "failed"
    return operation_id


def cancelled_before_it_settled(pipeline: Pipeline, order_id: str) -> None:
    """An order never paid: the load retries until the cancel stops it."""
    pipeline.fake.add_order(order(order_id, ("SKU-OK", 1)), ready_after_reads=100_000)
    operation_id = submit_operation(order_id)
    pipeline.wait_for([operation_id], lambda op: op.retry_count >= 1)
    assert request_cancellation(operation_id, "tester", "never paid").final_status == "cancelled"


def settled_samples(exposition: str) -> dict[str, float]:
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == "stock_sync_order_deductions_settled_total"
    }


def test_the_in_app_alert_and_the_prometheus_rule_count_the_same_order_deductions(
    pipeline: Pipeline, retry_limits: Callable[..., None], tmp_path: Path
) -> None:
    retry_limits(max_retries_pending=500, retry_backoff_max_s=0.05)
    pipeline.set_stock(**{"SKU-OK": 100, "SKU-LATE": 1, "SKU-NONE": 1})
    for number in range(5):
        completed(pipeline, f"ok-{number}")
    for number in range(2):  # completed, then cancelled: still settled once, as completed
        result = request_cancellation(completed(pipeline, f"undone-{number}"), "ops", "refund")
        adjustments = [uuid.UUID(i) for i in result.to_dict()["adjustment_operation_ids"]]
        pipeline.wait_for(adjustments, lambda op: op.status == "completed")
    late = failed(pipeline, "late", "SKU-LATE")
    pipeline.set_stock(**{"SKU-LATE": 2})
    successor = retry_operation(late).successor_operation_id  # a second order deduction
    assert pipeline.wait_for([successor])[0].status == "completed"
    failed(pipeline, "none", "SKU-NONE")
    for number in range(2):
        cancelled_before_it_settled(pipeline, f"unpaid-{number}")

    # 8 completed (5 + 2 cancelled later + the successor), 2 failed: 2 / 10 = 20 %. The 4
    # completed adjustments, the 2 cancelled before settling and the later cancellations of
    # completed ones count nowhere.
    now = datetime.now(UTC)
    snapshot = read_metrics(pipeline.database, SETTINGS, now=now)
    assert dict(snapshot.settled_total) == {"completed": 8, "failed": 2}
    assert dict(snapshot.settled_in_window) == {"completed": 8, "failed": 2}
    check = run_alert_check(pipeline.database, SETTINGS, now=now, webhook_url="")
    (error_rate,) = [alert for alert in check.alerts if alert.rule == HIGH_ERROR_RATE]
    assert error_rate.value == 0.2

    # The same counters, scraped: no increase before minute 71, then the measured values;
    # the rule sees 20 % of 10 over its hour from minute 71 and fires after its 10 minutes.
    exposition = render_prometheus(snapshot)
    samples = settled_samples(exposition)
    assert samples == {"completed": 8.0, "failed": 2.0}
    series = [
        {
            "series": f'stock_sync_order_deductions_settled_total{{outcome="{outcome}"}}',
            "values": f"0x70 {value:g}x60",
        }
        for outcome, value in samples.items()
    ]
    labels = alert_rules()["StockSyncHighErrorRate"]["labels"]
    cases = [
        {"eval_time": "79m", "alertname": "StockSyncHighErrorRate", "exp_alerts": []},
        {
            "eval_time": "82m",
            "alertname": "StockSyncHighErrorRate",
            "exp_alerts": [{"exp_labels": labels}],
        },
    ]
    result = run_rule_tests(tmp_path, series, cases)
    assert result.returncode == 0, result.stdout + result.stderr

    # And the completion times went into the histogram: one observation per completion.
    histogram_count = next(
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == "stock_sync_processing_seconds_count"
    )
    assert histogram_count == 8

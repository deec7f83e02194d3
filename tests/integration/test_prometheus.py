"""The metrics server and docker/prometheus-alerts.yml against a real Prometheus server.

tests/ensure_promtool.sh (``make tools``) unpacks Debian's ``prometheus`` into .venv/bin. The
test scrapes the project's metrics server every second over the test database, evaluates a
copy of the alert rules every second (only their ``for:`` shortened to 2s, so the test does
not wait minutes), and asks Prometheus's HTTP API what it sees.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from stock_sync.adapters.db import Database
from stock_sync.adapters.operation_events import SqlEventStore
from stock_sync.adapters.settings import Settings
from stock_sync.domain.log_actions import LogAction
from stock_sync.entrypoints.metrics_server import make_metrics_server
from tests.support import insert_operation

REPO = Path(__file__).resolve().parents[2]
ALERTS_FILE = REPO / "docker" / "prometheus-alerts.yml"
STUCK_AFTER_S = 900.0
SETTINGS = Settings(stuck_after_s=STUCK_AFTER_S, metrics_cache_s=0)
DEADLINE_S = 60.0
TEST_FOR = "2s"


def prometheus_binary() -> str:
    beside_python = Path(sys.executable).with_name("prometheus")
    found = shutil.which("prometheus") or (str(beside_python) if beside_python.exists() else None)
    assert found, "prometheus is missing: run tests/ensure_promtool.sh (make tools does)"
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def metrics_url(clean_database: Database) -> Iterator[str]:
    server = make_metrics_server(clean_database, SETTINGS, "127.0.0.1", 0, lambda: 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def rules_with_short_for(target: Path) -> None:
    """docker/prometheus-alerts.yml with every ``for:`` set to TEST_FOR; nothing else changed."""
    document = yaml.safe_load(ALERTS_FILE.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = TEST_FOR
    target.write_text(yaml.safe_dump(document))


@pytest.fixture
def prometheus(metrics_url: str, tmp_path: Path) -> Iterator[str]:
    """A Prometheus scraping the metrics server every second; yields its API base URL."""
    rules_with_short_for(tmp_path / "rules.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yml")],
        "scrape_configs": [
            {"job_name": "stock-sync", "static_configs": [{"targets": [metrics_url]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            prometheus_binary(),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        exited_early = process.poll() is not None
        process.kill()
        process.wait(timeout=30)
        log.close()
        if exited_early:  # why it is not answering, for the failure report
            print((tmp_path / "prometheus.log").read_text()[-4000:])


def api(base: str, path: str, **params: str) -> Any:
    """The ``data`` of a Prometheus API answer, or None while Prometheus is not up yet."""
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.load(response)
    except (urllib.error.URLError, ConnectionError):
        return None
    assert answer["status"] == "success", answer
    return answer["data"]


def poll(what: str, check: Callable[[], Any]) -> Any:
    """``check()``'s first truthy answer within DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        answer = check()
        if answer:
            return answer
        assert time.monotonic() < deadline, f"Prometheus never showed {what} in {DEADLINE_S}s"
        time.sleep(0.25)


def record_completion(database: Database) -> None:
    """An operation completed, with its audit event (which raises the counter)."""
    now = datetime.now(UTC)
    operation_id = insert_operation(
        database, status="completed", created_at=now, updated_at=now, completed_at=now
    )
    with database.transaction() as session:
        SqlEventStore(session).record(
            operation_id=operation_id,
            action=LogAction.MICROSERVICE_SYNC_SUCCESS.value,
            from_status="stock_deducted",
            to_status="completed",
            error_type=None,
            details={},
        )


def test_prometheus_scrapes_the_counters_and_fires_the_stuck_alert(
    prometheus: str, clean_database: Database
) -> None:
    long_ago = datetime.now(UTC) - timedelta(seconds=STUCK_AFTER_S + 600)
    stuck = insert_operation(  # an attempt that started long ago and never ended
        clean_database,
        status="processing",
        created_at=long_ago,
        updated_at=long_ago,
        attempt_started_at=long_ago,
    )

    def stuck_alert() -> list[dict[str, Any]]:
        data = api(prometheus, "/api/v1/alerts")
        alerts = data["alerts"] if data else []
        return [
            alert
            for alert in alerts
            if alert["labels"]["alertname"] == "StockSyncStuckOperations"
            and alert["state"] in ("pending", "firing")
        ]

    alerts = poll("the StockSyncStuckOperations alert", stuck_alert)
    print(f"\nstuck operation {stuck}; Prometheus /api/v1/alerts reports:")
    print(json.dumps(alerts, indent=2))
    assert alerts[0]["labels"]["severity"] == "critical"
    assert float(alerts[0]["value"]) == 1

    # The counter is scraped from zero; a completion then shows in increase().
    poll(
        "stock_sync_operations_finished_total",
        lambda: (
            api(prometheus, "/api/v1/query", query="stock_sync_operations_finished_total") or {}
        ).get("result"),
    )
    record_completion(clean_database)
    query = 'increase(stock_sync_operations_finished_total{status="completed"}[1m]) > 0'
    result = poll(
        query, lambda: (api(prometheus, "/api/v1/query", query=query) or {}).get("result")
    )
    print(f"{query}:\n{json.dumps(result, indent=2)}")
    assert result[0]["metric"]["job"] == "stock-sync"
    assert float(result[0]["value"][1]) > 0

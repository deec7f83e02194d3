"""``python -m stock_sync_dev.demo`` as ``make demo`` runs it: a real process with a real
worker.

Once embedded (no server: SQLite + Celery's filesystem transport) and once against the test
PostgreSQL and Redis. Each run must exit 0 and print the outcome every scenario must reach.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.conftest import REDIS_URL

REPO_ROOT = Path(__file__).resolve().parents[2]
HANG_GUARD_S = 300  # only stops a hung demo from hanging the suite; the demo's own limit is 120 s

ROW = re.compile(
    r"^(?P<order>demo-\w+-(?P<key>\d+))\s{2,}(?P<scenario>.+?)\s{2,}(?P<status>\w+)\s{2,}"
    r"(?P<retries>\d+)\s{2,}(?P<fulfillment>\w+)(?:\s{2,}(?P<note>.*))?$"
)
STOCK_ROW = re.compile(
    r"^(?P<sku>\w+-\w+)\s+(?P<start>\d+)\s+(?P<final>\d+)\s+(?P<expected>\d+)\s+(?P<ledger>-?\d+)"
    r"\s+(?P<lowest>-?\d+)$"
)


@dataclass(frozen=True)
class Row:
    scenario: str
    status: str
    fulfillment: str
    note: str


def run_demo(tmp_path: Path, **settings: str) -> str:
    """Run the demo in ``tmp_path`` with only the given STOCK_SYNC_* settings; its output."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("STOCK_SYNC_")}
    environment.update(settings, STOCK_SYNC_DATA_DIR=str(tmp_path))
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")])
    )
    result = subprocess.run(
        [sys.executable, "-m", "stock_sync_dev.demo"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def final_states(output: str) -> dict[str, Row]:
    """The 'Final states' table, by scenario key (the order id's last part)."""
    rows = {}
    for line in output.splitlines():
        match = ROW.match(line)
        if match:
            rows[match["key"]] = Row(
                match["scenario"], match["status"], match["fulfillment"], match["note"] or ""
            )
    return rows


def stock_rows(output: str) -> list[dict[str, int]]:
    return [
        {name: int(value) for name, value in match.groupdict().items() if name != "sku"}
        for match in map(STOCK_ROW.match, output.splitlines())
        if match
    ]


def assert_every_scenario_reached_its_outcome(output: str) -> None:
    assert "20/20 settled: 17 completed, 1 failed, 2 cancelled" in output
    rows = final_states(output)
    assert len(rows) == 20, output
    by_scenario = {row.scenario: row for row in rows.values()}
    happy = [row for row in rows.values() if row.scenario == "happy path"]
    assert len(happy) == 12
    assert all(row.status == "completed" and row.fulfillment == "PROCESSING" for row in happy)
    assert by_scenario["paid late (2 reads unpaid)"].status == "completed"
    assert "OrderNotReady" in by_scenario["paid late (2 reads unpaid)"].note
    assert by_scenario["GET fails twice (503)"].status == "completed"
    assert by_scenario["PUT fails twice (503)"].status == "completed"

    insufficient = by_scenario["insufficient stock"]
    assert insufficient.status == "failed" and "InsufficientStock" in insufficient.note

    upstream = by_scenario["cancelled upstream"]
    assert upstream.status == "cancelled" and "by marketplace" in upstream.note

    after = by_scenario["cancelled after completion"]
    assert after.status == "cancelled" and after.fulfillment == "NEW"
    assert "by demo-operator" in after.note and "microservice rollback completed" in after.note
    assert "fulfillment PUTs applied: PROCESSING -> NEW" in output


def assert_stock_adds_up(output: str) -> None:
    stock = stock_rows(output)
    assert len(stock) == 4, output
    for row in stock:
        assert row["final"] == row["expected"] == row["ledger"]
        assert row["lowest"] >= 0
    assert "invariants: all hold" in output


def test_the_demo_runs_embedded_without_any_server(tmp_path: Path) -> None:
    output = run_demo(tmp_path)
    assert "embedded: SQLite file + Celery's filesystem transport" in output
    assert_every_scenario_reached_its_outcome(output)
    assert_stock_adds_up(output)
    (run_folder,) = tmp_path.glob("demo-*")
    assert (run_folder / "stock_sync.sqlite3").exists() and (run_folder / "worker.log").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_folder.name]  # nothing else


def test_the_demo_runs_against_postgresql_and_redis(tmp_path: Path, postgres_url: str) -> None:
    output = run_demo(
        tmp_path, STOCK_SYNC_DATABASE_URL=postgres_url, STOCK_SYNC_BROKER_URL=REDIS_URL
    )
    assert "broker redis://" in output
    assert_every_scenario_reached_its_outcome(output)
    assert_stock_adds_up(output)
    tag = re.search(r"stock-sync demo, run (\w+)", output)
    assert tag is not None
    leftovers = redis.Redis.from_url(REDIS_URL).keys(f"*demo-{tag[1]}*")
    assert leftovers == []  # its queue and bindings are gone

"""``python -m stock_sync_dev.chaos`` sized down (200 orders, a 35 s fault phase): every fault
of the suite at once, then every invariant it checks must hold. Takes one to two minutes.

The suite prints each violated assertion with examples and timelines on stderr; the failure
message below carries them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
ORDERS = 200
FAULT_SECONDS = 35
HANG_GUARD_S = 600  # only stops a hung run from hanging the suite
EXIT_HARNESS_FAILED = 2


def run_suite(
    module: str, *arguments: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``python -m stock_sync_dev.MODULE --json ARGUMENTS``: its result and its JSON report
    (the harness itself must not have failed)."""
    result = subprocess.run(
        [sys.executable, "-m", f"stock_sync_dev.{module}", "--json", *arguments],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode != EXIT_HARNESS_FAILED, result.stderr[-6000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return result, report


def run_chaos(evidence: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    return run_suite(
        "chaos", "--orders", str(ORDERS), "--fault-seconds", str(FAULT_SECONDS),
        "--evidence-dir", str(evidence),
    )  # fmt: skip


@pytest.mark.slow
def test_every_invariant_holds_under_the_fault_suite(tmp_path: Path) -> None:
    result, report = run_chaos(tmp_path / "evidence")

    # the faults really happened
    assert report["kills"] >= 1
    assert report["broker_restarts"] >= 1
    assert report["cancels"] >= 1
    assert report["failed"] >= 1  # the greedy orders, at least
    assert report["calm_reached"], result.stderr[-6000:]

    violated = {
        assertion["name"]: assertion["examples"]
        for assertion in report["assertions"]
        if not assertion["ok"]
    }
    assert violated == {}, report["summary"] + "\n" + result.stderr[-8000:]
    assert result.returncode == 0


def run_time_mode(mode: str, *arguments: str) -> dict[str, Any]:
    result, report = run_suite("chaos_time", "--mode", mode, *arguments)
    violated = [a["name"] for a in report["assertions"] if not a["ok"]]
    assert violated == [] and result.returncode == 0, report["summary"] + result.stderr[-6000:]
    return report


@pytest.mark.slow
def test_a_backlog_older_than_the_stuck_threshold_only_waits() -> None:
    """120 orders queued with no worker for four stuck thresholds: nothing fails, nothing is
    re-driven, no stage runs twice (the full run: make chaos MODE=backlog)."""
    report = run_time_mode("backlog", "--orders", "120", "--backlog-age", "4")
    assert report["longest_wait_x_stuck"] >= 4  # the queue really was that old
    assert (report["failed"], report["redriven"], report["duplicate_stage_runs"]) == (0, 0, 0)


@pytest.mark.slow
def test_an_outage_longer_than_the_budgets_is_recovered_by_retry_failed() -> None:
    """40 orders FAILED by a microservice outage (half before, half after deducting), then
    `stock-sync retry --failed`: every order completes with one deduction and one sync (the
    full run: make chaos MODE=outage)."""
    report = run_time_mode("outage", "--orders", "40")
    assert report["failed_before"] == 40 and report["failed_after_deducting"] == 20
    assert report["retried"] == 40 and report["latest_completed"] == 40

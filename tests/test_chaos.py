"""``python -m stock_sync.devtools.chaos`` sized down (200 orders, a 35 s fault phase): every fault
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

REPOSITORY = Path(__file__).resolve().parent.parent
ORDERS = 200
FAULT_SECONDS = 35
HANG_GUARD_S = 600  # only stops a hung run from hanging the suite
EXIT_HARNESS_FAILED = 2


def run_chaos(evidence: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    result = subprocess.run(
        [
            sys.executable, "-m", "stock_sync.devtools.chaos", "--orders", str(ORDERS),
            "--fault-seconds", str(FAULT_SECONDS), "--json", "--evidence-dir", str(evidence),
        ],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert result.returncode != EXIT_HARNESS_FAILED, result.stderr[-6000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return result, report


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

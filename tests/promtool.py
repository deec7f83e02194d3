"""promtool (tests/ensure_promtool.sh, ``make tools``, unpacks it into .venv/bin): the checks
the alert rules and the metrics exposition must pass."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
ALERTS_FILE = REPO / "docker" / "prometheus-alerts.yml"


def promtool() -> str:
    beside_python = Path(sys.executable).with_name("promtool")
    found = shutil.which("promtool") or (str(beside_python) if beside_python.exists() else None)
    assert found, "promtool is missing: run tests/ensure_promtool.sh (make tools does)"
    return found


def alert_rules_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(ALERTS_FILE.read_text())
    return document


def alert_rules() -> dict[str, dict[str, Any]]:
    """Every alerting rule of docker/prometheus-alerts.yml by its name."""
    return {
        rule["alert"]: rule
        for group in alert_rules_document()["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def run_rule_tests(
    folder: Path, input_series: list[dict[str, str]], cases: list[dict[str, Any]]
) -> subprocess.CompletedProcess[str]:
    """``promtool test rules`` of the alert rules (annotations left out: the cases check which
    alerts fire with which labels) on ``input_series`` sampled every minute."""
    document = alert_rules_document()
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (folder / "rules.yml").write_text(yaml.safe_dump(document))
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": input_series, "alert_rule_test": cases}],
    }
    (folder / "tests.yml").write_text(yaml.safe_dump(tests))
    return subprocess.run(
        [promtool(), "test", "rules", "tests.yml"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
    )


def check_metrics(exposition: str) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` (the naming and format lint) of a /metrics answer."""
    return subprocess.run(
        [promtool(), "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        check=False,
    )

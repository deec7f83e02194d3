"""The README is a manual that cannot drift: its Configuration table is the output of
`stock-sync settings --markdown`, every Prometheus alert's runbook_url lands on a runbook
section of it, and its links and the repository paths it names (and those of docs/ and
docker/README.md) lead to files that exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from stock_sync.adapters.settings import Settings
from stock_sync.entrypoints import cli_settings

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
ALERTS_FILE = REPO / "docker" / "prometheus-alerts.yml"
TABLE_BEGIN = "<!-- settings-table:begin (generated: stock-sync settings --markdown) -->"
TABLE_END = "<!-- settings-table:end -->"
MAX_LINES = 260  # "at most about 250 lines"
CLI = str(Path(sys.executable).with_name("stock-sync"))


def settings_command(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "settings", *arguments],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=60,
        check=False,
    )


def readme() -> str:
    return README.read_text(encoding="utf-8")


def documented_table() -> str:
    text = readme()
    assert text.count(TABLE_BEGIN) == 1 and text.count(TABLE_END) == 1, "table markers"
    return text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip("\n")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    kept = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return kept.replace(" ", "-")


def sections() -> dict[str, str]:
    """Each heading's anchor and the text under it, down to the next heading."""
    found: dict[str, str] = {}
    parts = re.split(r"^#{1,6} (.+)$", readme(), flags=re.MULTILINE)
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        found[github_anchor(heading)] = body
    return found


def test_the_configuration_table_is_the_settings_command_output() -> None:
    result = settings_command("--markdown")
    assert result.returncode == 0, result.stderr
    assert documented_table() == result.stdout.strip("\n"), (
        "README's Configuration table differs from the settings model: replace the lines"
        " between the markers with the output of `stock-sync settings --markdown`"
    )


def test_every_setting_has_a_meaning_and_nothing_stale_is_described() -> None:
    fields = set(Settings.model_fields)
    assert set(cli_settings.MEANINGS) == fields
    assert set(cli_settings.RULES) <= fields
    assert set(cli_settings.COMPUTED_DEFAULTS) <= fields
    documented = set(re.findall(r"`(STOCK_SYNC_[A-Z0-9_]+)`", documented_table()))
    assert documented == {f"STOCK_SYNC_{name.upper()}" for name in fields}


def test_the_settings_command_lists_the_models_defaults_as_json_and_for_people() -> None:
    listed = json.loads(settings_command("--json").stdout)
    defaults = {row["variable"]: row["default"] for row in listed}
    assert len(listed) == len(Settings.model_fields)
    assert defaults["STOCK_SYNC_QUEUE_NAME"] == Settings.model_fields["queue_name"].default
    assert defaults["STOCK_SYNC_MAX_RETRIES_PENDING"] == 10
    assert all(row["meaning"] and "`" not in row["meaning"] for row in listed)
    human = settings_command().stdout
    assert "STOCK_SYNC_STUCK_AFTER_S = 900" in human
    assert settings_command("--json", "--markdown").returncode == 2


def test_every_alert_has_a_runbook_section_where_its_url_points() -> None:
    rules = [
        rule
        for group in yaml.safe_load(ALERTS_FILE.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    assert rules
    anchors = sections()
    for rule in rules:
        url = urlsplit(rule["annotations"]["runbook_url"])
        assert url.path.endswith("/README.md"), rule["alert"]
        assert url.fragment == f"runbook-{rule['alert'].lower()}", rule["alert"]
        assert url.fragment in anchors, f"no README section for {rule['alert']}"
        assert anchors[url.fragment].strip(), f"the runbook of {rule['alert']} is empty"


def test_relative_links_lead_to_files_that_exist() -> None:
    pages = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "docker" / "README.md"]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = target.split("#", 1)[0]
            assert (page.parent / path).exists(), f"{page.name} links {target}: no such file"


REPOSITORY_PATH = re.compile(
    r"`((?:stock_sync|stock_sync_dev|stock_sync_fake|tasks|tests|docker|migrations|docs)/[\w./-]*)`"
)
# Paths the pages name that the operator creates, not the repository.
CREATED_BY_THE_OPERATOR = {"docker/.env"}


def test_every_repository_path_the_pages_name_exists() -> None:
    pages = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "docker" / "README.md"]
    for page in pages:
        for path in REPOSITORY_PATH.findall(page.read_text(encoding="utf-8")):
            if path not in CREATED_BY_THE_OPERATOR:
                assert (REPO / path).exists(), f"{page.relative_to(REPO)} names {path}: gone"


def test_the_readme_stays_a_manual() -> None:
    assert len(readme().splitlines()) <= MAX_LINES

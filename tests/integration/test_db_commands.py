"""`stock-sync db current` and `db history`: where a database stands against the migrations."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

from stock_sync.adapters import schema
from stock_sync.adapters.redaction import redact_url

CLI = str(Path(sys.executable).with_name("stock-sync"))
VERSIONS = Path(__file__).resolve().parents[2] / "migrations" / "versions"


def run(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "db", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "STOCK_SYNC_DATABASE_URL": database_url},
        timeout=120,
    )


def revisions_in_the_source_tree() -> dict[str, str | None]:
    """revision -> down_revision, read from the scripts' text (not through alembic)."""
    found: dict[str, str | None] = {}
    for script in VERSIONS.glob("*.py"):
        values = {
            node.target.id: ast.literal_eval(node.value)
            for node in ast.parse(script.read_text()).body
            if isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.value is not None
        }
        found[values["revision"]] = values["down_revision"]
    return found


def test_history_lists_every_migration_newest_first_with_its_message() -> None:
    in_tree = revisions_in_the_source_tree()

    result = run("history", "--json", database_url="postgresql://nobody@127.0.0.1:1/none")

    assert result.returncode == 0, result.stderr  # no database needed
    revisions = json.loads(result.stdout)
    assert {r["revision"]: r["down_revision"] for r in revisions} == in_tree
    assert [r["is_head"] for r in revisions] == [True] + [False] * (len(revisions) - 1)
    assert revisions[-1]["down_revision"] is None
    for newer, older in pairwise(revisions):
        assert newer["down_revision"] == older["revision"]
    assert all(r["message"] for r in revisions)
    assert revisions[-1]["message"] == "initial schema"


def test_history_as_a_table() -> None:
    result = run("history", database_url="postgresql://nobody@127.0.0.1:1/none")

    assert result.returncode == 0, result.stderr
    head = schema.history()[0]
    assert f"{head.revision} (head)" in result.stdout
    assert "initial schema" in result.stdout


def test_current_follows_the_database_from_empty_to_the_head(
    make_throwaway_database: Callable[[], str],
) -> None:
    url = make_throwaway_database()
    head, previous = (revision.revision for revision in schema.history()[:2])

    empty = run("current", "--json", database_url=url)
    assert empty.returncode == 0, empty.stderr
    assert json.loads(empty.stdout)["current"] == []
    assert "run 'stock-sync db upgrade'" in run("current", database_url=url).stdout

    schema.upgrade(url, previous)
    behind = json.loads(run("current", "--json", database_url=url).stdout)
    assert (behind["current"], behind["heads"], behind["is_head"]) == ([previous], [head], False)
    assert f"is at {previous}, not at the head {head}" in run("current", database_url=url).stdout

    schema.upgrade(url)
    at_head = json.loads(run("current", "--json", database_url=url).stdout)
    assert (at_head["current"], at_head["is_head"]) == ([head], True)
    assert at_head["database"] == redact_url(url)
    assert run("current", database_url=url).stdout.strip().endswith(f"is at {head} (head)")


def test_current_on_an_unreachable_database_is_one_line_without_the_password() -> None:
    result = run("current", database_url="postgresql://stock:S3CRETPW@127.0.0.1:1/none")

    assert result.returncode == 1
    assert result.stderr.startswith(
        "error: cannot reach the database at postgresql://stock:***@127.0.0.1:1/none"
    )
    assert len(result.stderr.splitlines()) == 1
    assert "S3CRETPW" not in result.stderr + result.stdout and result.stdout == ""

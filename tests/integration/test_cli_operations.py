"""submit / show / list / cancel as an operator runs them: real processes, real worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from stock_sync.domain.statuses import OperationStatus
from tests.support import Pipeline, order

CLI = str(Path(sys.executable).with_name("stock-sync"))


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=90
    )


def test_submit_prints_the_operation_id_alone_and_show_prints_its_timeline(
    pipeline: Pipeline,
) -> None:
    pipeline.set_stock(**{"SKU-C": 3})
    pipeline.fake.add_order(order("cli-1", ("SKU-C", 2)))
    submitted = run("submit", "cli-1", "--account", "shop-1")
    assert submitted.returncode == 0, submitted.stderr
    operation_id = submitted.stdout.strip()
    assert len(operation_id) == 36 and "\n" not in operation_id

    pipeline.wait_for([uuid.UUID(operation_id)])
    shown = run("show", operation_id, "--json")
    details = json.loads(shown.stdout)
    assert details["id"] == operation_id and details["status"] == "completed"
    assert details["order_id"] == "cli-1" and details["account_name"] == "shop-1"
    assert details["line_items"][0]["sku"] == "SKU-C" and details["retry_count"] == 0
    assert (
        details["stock_deducted_at"]
        and details["microservice_synced_at"]
        and details["line_items_loaded_at"]
    )
    assert details["events"][0]["action"] == "operation_created"
    assert set(details["events"][0]) == {"action", "from_status", "to_status", "at", "details"}
    human = run("show", operation_id)
    assert (
        "timeline:" in human.stdout
        and "status_transition stock_deducted -> completed" in human.stdout
    )


def test_list_filters_by_status_and_order(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-C": 1})
    pipeline.fake.add_order(order("cli-ok", ("SKU-C", 1)))
    pipeline.fake.add_order(order("cli-bad", ("SKU-C", 1)), malformed="json")
    ids = [run("submit", name).stdout.strip() for name in ("cli-ok", "cli-bad")]

    pipeline.wait_for([uuid.UUID(i) for i in ids])
    failed = json.loads(run("list", "--status", "failed", "--json").stdout)
    assert [row["order_id"] for row in failed] == ["cli-bad"]
    by_order = json.loads(run("list", "--order", "cli-ok", "--json").stdout)
    assert len(by_order) == 1
    assert set(by_order[0]) >= {
        "id", "order_id", "account_name", "status", "operation_type",
        "parent_operation_id", "created_at", "updated_at",
    }  # fmt: skip
    assert by_order[0]["status"] == OperationStatus.COMPLETED.value
    assert "cli-ok" in run("list").stdout


def test_cancel_prints_the_result_and_waits_for_the_rollback(pipeline: Pipeline) -> None:
    pipeline.set_stock(**{"SKU-C": 2})
    pipeline.fake.add_order(order("cli-cancel", ("SKU-C", 2)))
    operation_id = run("submit", "cli-cancel").stdout.strip()

    pipeline.wait_for([uuid.UUID(operation_id)])
    result = run(
        "cancel", operation_id, "--by", "ops", "--reason", "duplicate order", "--wait", "--json"
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["cancelled_from"] == "completed" and payload["final_status"] == "cancelled"
    assert payload["stock_restored"] and payload["microservice_rollback"] == "completed"
    assert payload["restored_movements"] == [
        {"sku": "SKU-C", "quantity": 2, "line_item_id": "cli-cancel-line-1"}
    ]
    assert pipeline.stock("SKU-C") == 2
    again = run("cancel", operation_id, "--by", "ops", "--reason", "again")
    assert again.returncode == 0 and "cancelled from completed" in again.stdout


def test_bad_input_is_one_line_and_writes_nothing(pipeline: Pipeline) -> None:
    for args, message in [
        (("submit", ""), "order_id must not be empty"),
        (("submit", "x" * 200), "order_id is longer than 128 characters"),
        (("show", "not-a-uuid"), "not an operation id"),
        (
            ("cancel", "6f1c1a37-4d7e-4f57-9f3a-0d6f3f0c0c0c", "--by", "x", "--reason", "y"),
            "operation not found",
        ),
    ]:
        result = run(*args)
        assert result.returncode == 1, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert json.loads(run("list", "--json").stdout) == []


def test_a_refused_cancel_exits_non_zero_naming_the_status(pipeline: Pipeline) -> None:
    pipeline.fake.add_order(order("cli-failed", ("SKU-C", 1)), malformed="contract")
    operation_id = run("submit", "cli-failed").stdout.strip()

    pipeline.wait_for([uuid.UUID(operation_id)])
    result = run("cancel", operation_id, "--by", "ops", "--reason", "x")
    assert result.returncode == 1 and "cannot be cancelled: it is failed" in result.stderr


def test_a_broker_that_is_down_leaves_the_operation_pending_and_says_so(pipeline: Pipeline) -> None:
    result = run("submit", "while-broker-down", STOCK_SYNC_BROKER_URL="redis://127.0.0.1:1/0")
    assert result.returncode == 3, result.stderr
    operation_id = result.stdout.strip()
    assert (
        "saved as pending but not enqueued" in result.stderr
        and "sweep will re-drive" in result.stderr
    )
    rows = json.loads(run("list", "--order", "while-broker-down", "--json").stdout)
    assert [(row["id"], row["status"]) for row in rows] == [(operation_id, "pending")]

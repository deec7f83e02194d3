"""``stock-sync submit --file``: a batch of orders from a file or stdin, as an operator runs it
(real processes, the in-process worker, real PostgreSQL and Redis)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from sqlalchemy import func, select

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import OperationEvent, PendingStockOperation
from stock_sync.producer import submit_operation
from tests.support import Pipeline, order

CLI = str(Path(sys.executable).with_name("stock-sync"))


def run(
    *args: str, stdin: str | bytes | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    result = subprocess.run(
        [CLI, *args], capture_output=True, input=data, env={**os.environ, **env}, timeout=90
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def count_rows(database: Database) -> tuple[int, int]:
    with database.transaction() as session:
        operations = session.scalar(select(func.count()).select_from(PendingStockOperation))
        events = session.scalar(select(func.count()).select_from(OperationEvent))
    return int(operations or 0), int(events or 0)


def test_a_file_of_plain_and_json_lines_prints_each_lines_id_in_order(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    pipeline.set_stock(**{"SKU-F": 10})
    for name in ("file-1", "file-2", "file-3", "file-old"):
        pipeline.fake.add_order(order(name, ("SKU-F", 1)))
    old = submit_operation("file-old")
    orders = tmp_path / "orders.txt"
    orders.write_text(
        "\ufefffile-1 shop-1\n"
        "\n"
        '{"order_id": "file-2", "account_name": null}\r\n'
        "file-old\n"
        "file-1\n"
        '{"order_id": "file-3"}\n'
    )

    result = run("submit", "--file", str(orders))

    assert result.returncode == 0, result.stderr
    ids = [uuid.UUID(line) for line in result.stdout.splitlines()]
    assert len(ids) == 5 and ids[2] == old and ids[0] == ids[3]
    assert "submitted 5 orders" in result.stderr and "3 new operations, 1 submitted before" in (
        result.stderr
    )
    rows = pipeline.wait_for(set(ids))
    assert {row.status for row in rows} == {"completed"}
    by_id = {row.id: row.order_id for row in rows}
    assert [by_id[i] for i in ids] == ["file-1", "file-2", "file-old", "file-1", "file-3"]


def test_stdin_and_json_output_list_lines_orders_and_ids(pipeline: Pipeline) -> None:
    pipeline.fake.add_order(order("stdin-1", ("SKU-F", 1)))
    pipeline.set_stock(**{"SKU-F": 1})

    result = run("submit", "--file", "-", "--json", stdin="stdin-1 shop-1\nstdin-1\n")

    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    first, second = payload["orders"]
    assert (first["line"], first["order_id"], first["created"]) == (1, "stdin-1", True)
    assert (second["line"], second["operation_id"], second["created"]) == (
        2,
        first["operation_id"],
        True,
    )
    assert payload["created"] == 1 and payload["not_enqueued"] == []
    pipeline.wait_for([uuid.UUID(first["operation_id"])])


def test_a_bad_line_refuses_the_file_naming_its_line_and_writes_nothing(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    orders = tmp_path / "orders.txt"
    for content, message in [
        ("ok-1\nok-2\nok-3 " + "a" * 129 + "\n", "orders.txt, line 3: account_name is longer"),
        ('ok-1\n\n{"order_id": ""}\n', "line 3: order_id must not be empty"),
        ('ok-1\n{"order": "x"}\n', "line 2: unknown key 'order'"),
        ("ok-1\n{not json\n", "line 2: not valid JSON"),
        ('ok-1\n{"order_id": 7}\n', "line 2: order_id must be a string, got int"),
        ("ok-1\nx\x07y\n", "line 2: order_id must not contain control characters"),
        (b"ok-1\n\xff\xfe\n", "line 2: not UTF-8 text"),
        ("o" * 129 + "\n", "line 1: order_id is longer than 128 characters"),
    ]:
        if isinstance(content, bytes):
            orders.write_bytes(content)
        else:
            orders.write_text(content)

        result = run("submit", "--file", str(orders))

        assert result.returncode == 1, (content, result.stderr)
        assert message in result.stderr, (content, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert count_rows(pipeline.database) == (0, 0)


def test_an_account_contradiction_refuses_the_whole_file(pipeline: Pipeline) -> None:
    pipeline.fake.add_order(order("taken", ("SKU-F", 1)))
    submit_operation("taken", "shop-1")
    pipeline.wait_for([submit_operation("taken")])
    before = count_rows(pipeline.database)

    result = run("submit", "--file", "-", stdin="new-1\ntaken shop-2\n")

    assert result.returncode == 1
    assert "orders[1]: account_name: order taken already has operation" in result.stderr
    assert count_rows(pipeline.database) == before


def test_a_broker_that_is_down_leaves_the_batch_pending_and_says_so(pipeline: Pipeline) -> None:
    result = run(
        "submit",
        "--file",
        "-",
        "--json",
        stdin="down-1\ndown-2\ndown-1\n",
        STOCK_SYNC_BROKER_URL="redis://127.0.0.1:1/0",
    )

    assert result.returncode == 3, result.stderr
    payload = json.loads(result.stdout)
    ids = [line["operation_id"] for line in payload["orders"]]
    assert ids[0] == ids[2] and payload["not_enqueued"] == ids[:2]
    assert "2 of 2 new operations saved as pending but not enqueued" in result.stderr
    with pipeline.database.transaction() as session:
        rows = session.execute(select(PendingStockOperation.id, PendingStockOperation.status)).all()
    assert sorted((str(i), s) for i, s in rows) == sorted((i, "pending") for i in ids[:2])


def test_order_id_and_file_go_one_at_a_time(pipeline: Pipeline) -> None:
    for args, message in [
        ((), "give either ORDER_ID or --file FILE"),
        (("x-1", "--file", "-"), "give either ORDER_ID or --file FILE"),
        (("--file", "-", "--account", "a"), "--account goes with ORDER_ID"),
        (("x-1", "--json"), "--json goes with --file"),
        (("--file", "/nonexistent/orders.txt"), "cannot read /nonexistent/orders.txt"),
    ]:
        result = run("submit", *args, stdin="")
        assert result.returncode in (1, 2), (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    assert count_rows(pipeline.database) == (0, 0)

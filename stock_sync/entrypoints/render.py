"""Human renderings of what the CLI prints (``--json`` prints the data itself)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [
        ["" if c is None else str(c) for c in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def _short_time(value: str | None) -> str:
    return value[11:23] if value else ""


def operation(details: dict[str, Any]) -> str:
    lines = [
        f"operation {details['id']}  ({details['operation_type']})",
        f"  order:        {details['order_id']}  account: {details['account_name'] or '-'}",
        f"  status:       {details['status']}  retries in stage: {details['retry_count']}",
    ]
    if details.get("order_revision") is not None:
        lines.append(
            f"  revision:     {json.dumps(details['order_revision'])}  fulfillment before sync: "
            f"{details.get('fulfillment_status_before_sync') or '-'}"
        )
    if details.get("parent_operation_id"):
        lines.append(f"  parent:       {details['parent_operation_id']}")
    if details.get("retry_of"):
        lines.append(f"  retry of:     {details['retry_of']}")
    if details.get("retried_as"):
        lines.append(f"  retried as:   {details['retried_as']}")
    if details.get("failed_stage"):
        lines.append(f"  failed in:    {details['failed_stage']}")
    if details.get("next_retry_at") and details["status"] in LIVE:
        waits = "in the database" if not details.get("dispatched_at") else "as a countdown"
        lines.append(f"  next retry:   {details['next_retry_at']} ({waits})")
    if details.get("last_error"):
        lines.append(f"  last error:   {details['last_error_type']}: {details['last_error']}")
    if details.get("cancelled_by"):
        lines.append(
            f"  cancelled by: {details['cancelled_by']} ({details['cancellation_reason']})"
        )
    if details.get("rollback_operations"):
        lines.append(f"  adjustments:  {', '.join(details['rollback_operations'])}")
    lines.append("  line items:")
    lines += [
        f"    {item['id']}: {item['sku']} x {item['quantity']}" for item in details["line_items"]
    ] or ["    (not loaded yet)"]
    lines.append("  timeline:")
    for event in details["events"]:
        move = f" {event['from_status']} -> {event['to_status']}" if event["to_status"] else ""
        note = event["details"].get("details") or event["details"].get("reason") or ""
        error = event["details"].get("error_type")
        lines.append(
            f"    {_short_time(event['at'])}  {event['action']}{move}"
            + (f"  [{error}]" if error else "")
            + (f"  {note}" if note else "")
        )
    return "\n".join(lines)


def operation_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "no operations"
    return table(
        ("id", "order", "account", "type", "status", "retries", "created", "retry"),
        [
            (
                r["id"],
                r["order_id"],
                r["account_name"],
                r["operation_type"],
                r["status"],
                r["retry_count"],
                r["created_at"][:19],
                _retry_link(r),
            )
            for r in rows
        ],
    )


def _retry_link(row: dict[str, Any]) -> str:
    """``of <id8>`` for a successor, ``as <id8>`` for a retried operation."""
    if row.get("retried_as"):
        return f"as {row['retried_as'][:8]}"
    if row.get("retry_of"):
        return f"of {row['retry_of'][:8]}"
    return ""


LIVE = ("pending", "processing", "stock_deducted")


def retries(results: Sequence[dict[str, Any]], refused: Sequence[str]) -> str:
    """What ``stock-sync retry`` did: one line per successor, then what was refused."""
    lines = [
        f"{r['failed_operation_id']} (failed in {r['failed_stage'] or '?'}) -> "
        f"{r['successor_operation_id']}: "
        + (
            "takes over the deduction, goes on to the sync"
            if r["deduction_taken_over"]
            else "starts from the load"
        )
        + ("" if r["enqueued"] else " (not enqueued: the sweep re-drives it)")
        for r in results
    ]
    lines += [f"refused: {reason}" for reason in refused]
    lines.append(f"retried {len(results)} operation(s)")
    return "\n".join(lines)


def cancellation(result: dict[str, Any]) -> str:
    lines = [
        f"operation {result['operation_id']}: {result['final_status']}",
        f"  {result['message']}",
        f"  cancelled from: {result['cancelled_from']}  by: {result['cancelled_by']}",
        f"  microservice rollback: {result['microservice_rollback']}",
    ]
    if result["adjustment_operation_ids"]:
        lines.append(f"  adjustments: {', '.join(result['adjustment_operation_ids'])}")
    return "\n".join(lines)


def reconciliation(report: dict[str, Any]) -> str:
    head = (
        f"checked {report['stock_levels_checked']} stock levels and "
        f"{report['operations_checked']} operations: "
    )
    if report["ok"]:
        return head + "everything reconciles"
    rows = [(m["check"], m["subject"], m["message"]) for m in report["mismatches"]]
    return head + f"{len(rows)} mismatches\n" + table(("check", "subject", "problem"), rows)


def rollback_retry(result: dict[str, Any]) -> str:
    lines = [
        f"operation {result['operation_id']}: rollback {result['failed_rollback_id']} failed; "
        f"retrying it as {result['retry_rollback_id']}",
        f"  fulfillment status to be put back to {result['target_fulfillment_status']}",
    ]
    if not result["enqueued"]:
        lines.append("  not enqueued (broker unreachable): the stuck sweep will run it")
    return "\n".join(lines)


def marketplace_audit(report: dict[str, Any]) -> str:
    """What ``stock-sync check --marketplace`` found (and repaired)."""
    lines = [
        f"checked {report['checked']} orders settled since {report['since'][:19]}: "
        f"{report['drift']} drift, {report['repaired']} repaired, "
        f"{report['unreadable']} unreadable"
    ]
    for found in report["found"]:
        repair = f"  -> {found['repair']}" if found["repair"] else ""
        lines.append(
            f"  {found['drift']}: order {found['order_id']} (operation "
            f"{found['operation_id']}) shows {found['fulfillment_status']}"
            f"{' (cancelled upstream)' if found['order_status'] == 'CANCELLED' else ''}{repair}"
        )
    lines += [f"  unreadable: {line}" for line in report["unreadable_orders"]]
    return "\n".join(lines)

"""When each beat-driven maintenance task last ran: written by the task, read by health checks.

One row per task, overwritten by every run (an upsert), so the table stays a handful of rows.
Beat is alive when the sweep and the alert evaluation ran recently enough.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from stock_sync.adapters.db import Database
from stock_sync.adapters.models import MaintenanceRun, utcnow

SWEEP = "sweep_stuck_operations"
ALERTS = "evaluate_alerts"
RECONCILE = "reconcile"
RELEASE = "release_due_retries"
MARKETPLACE_AUDIT = "marketplace_audit"


@dataclass(frozen=True)
class LastRun:
    task: str
    started_at: datetime
    finished_at: datetime
    ok: bool
    host: str
    summary: Mapping[str, Any]


@dataclass
class RunRecord:
    """What a running task reports about itself; ``summary`` and ``ok`` may be filled in."""

    summary: dict[str, Any]
    ok: bool = True


@contextlib.contextmanager
def recorded_run(database: Database, task: str) -> Iterator[RunRecord]:
    """Record one run of ``task`` when it ends: ok, or not ok when it raised (re-raised)."""
    started = utcnow()
    record = RunRecord(summary={})
    try:
        yield record
    except Exception as error:
        record.ok = False
        record.summary = {"error": f"{type(error).__name__}: {error}"[:500]}
        raise
    finally:
        save_run(database, task, started, record)


def save_run(database: Database, task: str, started: datetime, record: RunRecord) -> None:
    values = {
        "task": task,
        "started_at": started,
        "finished_at": utcnow(),
        "ok": record.ok,
        "host": socket.gethostname()[:255],
        "summary": record.summary,
    }
    with database.transaction() as session:
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        statement = insert(MaintenanceRun).values(**values)
        session.execute(
            statement.on_conflict_do_update(
                index_elements=["task"],
                set_={name: statement.excluded[name] for name in values if name != "task"},
            )
        )


def last_runs(session: Session) -> dict[str, LastRun]:
    """The last run of every task that has run, by task name."""
    return {
        row.task: LastRun(
            row.task, row.started_at, row.finished_at, row.ok, row.host, row.summary or {}
        )
        for row in session.scalars(select(MaintenanceRun))
    }

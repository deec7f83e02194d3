"""When each beat-driven maintenance task last ran, and when beat last sent one: read by the
health checks and exported as metrics.

One row per task, overwritten by every run (an upsert), so the table stays a handful of rows:
the task's row is written by the worker that ran it; the row :data:`BEAT` by beat itself each
time it sent an entry (tasks/beat.py), so beat is judged by what it does, not by whether a
worker consumes the maintenance queue. A run that raised keeps the time of the last one that
succeeded in its summary (``last_success_at``), so a failing task does not erase it.
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
# Not a task: beat's own row, the last time it sent a scheduled entry.
BEAT = "beat"
LAST_SUCCESS_KEY = "last_success_at"


@dataclass(frozen=True)
class LastRun:
    task: str
    started_at: datetime
    finished_at: datetime
    ok: bool
    host: str
    summary: Mapping[str, Any]

    @property
    def last_success_at(self) -> datetime | None:
        """When it last finished without an error (this run, or the one a failure recorded)."""
        if self.ok:
            return self.finished_at
        earlier = self.summary.get(LAST_SUCCESS_KEY)
        try:
            return datetime.fromisoformat(earlier) if isinstance(earlier, str) else None
        except ValueError:
            return None


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


def save_run(
    database: Database,
    task: str,
    started: datetime,
    record: RunRecord,
    *,
    finished: datetime | None = None,
) -> None:
    values = {
        "task": task,
        "started_at": started,
        "finished_at": finished or utcnow(),
        "ok": record.ok,
        "host": socket.gethostname()[:255],
        "summary": record.summary,
    }
    with database.transaction() as session:
        if not record.ok:
            values["summary"] = {**record.summary, **_last_success(session, task)}
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        statement = insert(MaintenanceRun).values(**values)
        session.execute(
            statement.on_conflict_do_update(
                index_elements=["task"],
                set_={name: statement.excluded[name] for name in values if name != "task"},
            )
        )


def _last_success(session: Session, task: str) -> dict[str, str]:
    """What a failed run of ``task`` carries over from the row it replaces (locked, so two
    failing hosts do not lose it between them)."""
    found = session.scalar(
        select(MaintenanceRun).where(MaintenanceRun.task == task).with_for_update()
    )
    if found is None:
        return {}
    previous = _last_run(found).last_success_at
    return {LAST_SUCCESS_KEY: previous.isoformat()} if previous is not None else {}


def record_beat_send(database: Database, entry: str, task: str, sent_at: datetime) -> None:
    """Beat sent the schedule entry ``entry`` (task ``task``) at ``sent_at``."""
    save_run(
        database, BEAT, sent_at, RunRecord(summary={"entry": entry, "task": task}), finished=sent_at
    )


def _last_run(row: MaintenanceRun) -> LastRun:
    return LastRun(row.task, row.started_at, row.finished_at, row.ok, row.host, row.summary or {})


def last_runs(session: Session) -> dict[str, LastRun]:
    """The last run of every task that has run, by task name."""
    return {row.task: _last_run(row) for row in session.scalars(select(MaintenanceRun))}

"""Each maintenance task records its last run (what health checks read to tell beat is alive)."""

from __future__ import annotations

import pytest

from stock_sync.adapters.db import Database
from stock_sync.adapters.maintenance_runs import SWEEP, last_runs, recorded_run
from stock_sync.adapters.models import utcnow


def runs(database: Database) -> dict[str, tuple[bool, dict[str, object]]]:
    with database.transaction() as session:
        return {task: (run.ok, dict(run.summary)) for task, run in last_runs(session).items()}


def test_a_run_is_recorded_with_its_summary_and_the_next_overwrites_it(
    clean_database: Database,
) -> None:
    with recorded_run(clean_database, SWEEP) as run:
        run.summary = {"redriven": 2}
    first = runs(clean_database)
    with recorded_run(clean_database, SWEEP) as run:
        run.summary = {"redriven": 0}

    assert first == {SWEEP: (True, {"redriven": 2})}
    assert runs(clean_database) == {SWEEP: (True, {"redriven": 0})}
    with clean_database.transaction() as session:
        (last,) = last_runs(session).values()
        assert last.started_at <= last.finished_at <= utcnow() and last.host


def test_a_run_that_raised_is_recorded_as_not_ok_and_the_error_goes_on(
    clean_database: Database,
) -> None:
    with pytest.raises(RuntimeError), recorded_run(clean_database, SWEEP):
        raise RuntimeError("database went away")

    assert runs(clean_database) == {SWEEP: (False, {"error": "RuntimeError: database went away"})}


def test_the_sweep_task_records_its_run(
    pipeline_environment: str, clean_database: Database
) -> None:
    from tasks.maintenance import sweep_stuck_operations_task

    summary = sweep_stuck_operations_task()

    assert runs(clean_database)[SWEEP] == (True, summary)

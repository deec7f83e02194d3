"""The benchmark's measuring helpers, without a worker: the ``/proc`` readers, the
least-squares slope, the latency percentiles, the options, the profile summary and the SQL
counters of ``stock_sync.adapters.instrumentation`` (the benchmark itself, end to end:
tests/system/test_benchmark_smoke.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from stock_sync.adapters import instrumentation
from stock_sync_dev.bench import profiling
from stock_sync_dev.bench.cli import parse_options
from stock_sync_dev.bench.phases import LatencyRun
from stock_sync_dev.bench.procstat import least_squares_slope, read_stat, vm_rss_bytes
from tasks.app import app


def test_the_bare_chain_tasks_are_not_on_the_production_app() -> None:
    """Only the benchmark's worker loads them (--include): importing the benchmark does not."""
    import stock_sync_dev.benchmark  # noqa: F401

    assert not {name for name in app.tasks if name.startswith("stock_sync.benchmark.")}


def test_the_profile_summary_splits_samples_by_library_and_by_what_they_pass_through(
    tmp_path: Path,
) -> None:
    (tmp_path / "worker-pool-11.txt").write_text(
        "main (celery/app/trace.py:1);execute (sqlalchemy/engine/base.py:2);"
        "do_execute (sqlalchemy/engine/default.py:3) 6\n"
        "main (celery/app/trace.py:1);info (logging/__init__.py:4);"
        "format (pythonjsonlogger/core.py:5) 3\n"
    )
    (tmp_path / "worker-pool-12.txt").write_text("main (celery/app/trace.py:1) 1\n")

    summary = profiling.summarise_folder(tmp_path)

    assert summary.startswith("worker-pool: 10 samples")  # both pool processes merged
    assert " 60.0%  SQLAlchemy" in summary and " 30.0%  logging, JSON logger" in summary
    assert "100.0%  Celery: receiving, tracing, acking a task" in summary
    assert " 30.0%  JSON log formatting" in summary


def test_read_stat_and_rss_see_this_process() -> None:
    stat = read_stat(os.getpid())
    assert stat is not None
    assert stat.pid == os.getpid()
    assert stat.ppid == os.getppid()
    assert stat.ticks >= 0 and stat.reaped_ticks >= 0 and stat.start > 0
    assert vm_rss_bytes(os.getpid()) > 0
    assert read_stat(2**22 + 1) is None  # above any pid_max: no such process


def test_least_squares_slope() -> None:
    assert least_squares_slope([(0, 1.0), (1, 3.0), (2, 5.0)]) == pytest.approx(2.0)
    assert least_squares_slope([(0, 5.0), (10, 5.0)]) == 0.0
    assert least_squares_slope([(3, 5.0)]) == 0.0  # one point: no slope


def test_latency_percentiles_are_nearest_rank() -> None:
    run = LatencyRun(100, 100, 1.0, 0.0, [float(ms) for ms in range(100, 0, -1)], {})
    assert run.percentile(0.50) == 50.0
    assert run.percentile(0.95) == 95.0
    assert run.percentile(0.99) == 99.0


def test_options_quick_sizes_and_the_soak_switches() -> None:
    quick = parse_options(["--quick"])
    assert quick.soak > 0 and quick.task_events == "off" and not quick.soak_only
    full = parse_options([])
    assert (full.orders, full.soak, full.ratio_only, full.profile) == (2000, 0, False, None)
    assert parse_options(["--ratio-only", "--profile", "p"]).profile == "p"
    assert parse_options(["--soak-only"]).soak == 20_000
    assert parse_options(["--task-events", "on", "--soak", "10"]).task_events == "on"


def test_sql_counters_count_per_process_only_when_asked(tmp_path: Path) -> None:
    folder = tmp_path / "counts"
    assert not instrumentation.count_sql_if_asked({})
    assert instrumentation.count_sql_if_asked({instrumentation.COUNT_SQL_DIR_VARIABLE: str(folder)})
    engine = create_engine("sqlite://")
    try:
        with engine.begin() as connection:
            connection.execute(text("SELECT 1"))
            connection.execute(text("SELECT 2"))
        child = os.fork()
        if child == 0:  # a forked child counts into a file of its own
            try:
                engine.dispose(close=False)
                with engine.connect() as connection:
                    connection.execute(text("SELECT 3"))
                    connection.rollback()
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        counts = instrumentation.read_count_files(folder)
        assert counts[os.getpid()] == instrumentation.SqlCounts(statements=2, commits=1)
        assert counts[child] == instrumentation.SqlCounts(statements=1, rollbacks=1)
        assert instrumentation.total(counts).transactions == 2
        # a statement in autocommit is a transaction of its own
        with engine.connect() as connection:
            autocommit = connection.execution_options(isolation_level="AUTOCOMMIT")
            autocommit.execute(text("SELECT 6"))
        counts = instrumentation.read_count_files(folder)
        assert counts[os.getpid()] == instrumentation.SqlCounts(
            statements=3, commits=1, autocommits=1
        )

        labelled = instrumentation.LabelledSqlCounter(engine.url.database)
        instrumentation.install(labelled)
        with labelled.labelled("producer"), engine.begin() as connection:
            connection.execute(text("SELECT 4"))
        with engine.begin() as connection:
            connection.execute(text("SELECT 5"))
        assert labelled.counts() == {
            "producer": instrumentation.SqlCounts(statements=1, commits=1),
            "other": instrumentation.SqlCounts(statements=1, commits=1),
        }
    finally:
        instrumentation.uninstall()
        engine.dispose()

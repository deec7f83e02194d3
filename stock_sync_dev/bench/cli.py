"""``python -m stock_sync_dev.benchmark`` (``make benchmark``): performance measured the way
users run it, then what each operation costs.

Processes, as in production: one worker as users start it (``celery -A tasks worker -c 2``,
prefork, the project's configuration, log level WARNING; it also loads the bare chain's tasks
with ``--include``), producer processes of their own (``bench.producer_main``), the fake
microservice in a process of its own (``stock-sync fake-microservice``), PostgreSQL and Redis on
localhost. Phases:

1. ratio (the first line of the report): the bare chain, N chains of 4 no-op tasks chained with
   canvas on the same broker and settings (acks_late, prefetch 1, JSON, results ignored), sent
   one by one by a producer process, timed from the first send to the last chain done; then
   the pipeline, N orders over 20 SKUs submitted one by one with ``submit_operation`` by a
   producer process, timed from the first submit to the last operation terminal in the
   database. Their ratio (target >= 0.60), and the CPU of every process per chain / operation
   from ``/proc``: worker main process, pool processes, producer, the PostgreSQL backends of
   the worker and of the producer, redis-server, the fake.
2. batch: N other orders submitted with one ``submit_operations`` call: orders/s submitted, the
   end-to-end rate, the CPU.
   (``--ratio-only`` stops here; ``--profile DIR`` records py-spy profiles of the worker's
   processes and the producer during the pipeline run of phase 1 and summarises them.)
3. counted (a second worker, whose SQL is counted): SQL statements and transactions per
   operation (SQLAlchemy events in the worker and the producer; a statement in autocommit is a
   transaction of its own) and contract requests (counted by the fake, through its admin API).
4. latency: operations submitted open loop at half the rate of phase 1; p50/p95/p99 of
   ``completed_at - created_at``.
5. contention: orders on one hot SKU and on as many distinct SKUs, each stocked with exactly
   what the orders need; the ratio of the rates (target >= 0.90), oversold units and ledger
   mismatches (target 0).
6. soak (``--soak N``; ``make soak``): N operations kept flowing, the worker's RSS sampled; the
   least-squares slope after the first 20%, MB per 10,000 operations (target < 1).
7. queries: 1,000,000 finished operations bulk-loaded; the median stuck sweep round and
   ``collect_metrics`` (target < 50 ms each), and whether the sweep's plan uses its index.

Nothing waits fixed times: rates come from the timestamps the processes recorded, counts from
counters. Everything runs in a throwaway database and a queue of its own; the processes, the
database and the queue are removed on exit, Ctrl-C and SIGTERM included. Inherited
``STOCK_SYNC_*`` variables are ignored. A missed target is printed as MISSED and still exits 0
(a measurement, not a test); an error exits 1, Ctrl-C 130.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import redis
from sqlalchemy.engine import make_url

from stock_sync.adapters.db import Database
from stock_sync.adapters.instrumentation import LabelledSqlCounter
from stock_sync.adapters.instrumentation import install as count_own_sql
from stock_sync.adapters.instrumentation import uninstall as uninstall_sql_counter
from stock_sync.adapters.settings import Settings
from stock_sync_dev import cli_args
from stock_sync_dev.bench import phases, profiling, report
from stock_sync_dev.bench.harness import (
    DEFAULT_REDIS_URL,
    TASK_EVENTS_VARIABLE,
    BenchmarkError,
    FakeProcess,
    configure_this_process,
    forget_redis_keys,
    harness_variables,
    run_environment,
    running_worker,
    say,
    throwaway_database,
    worker_variables,
)
from stock_sync_dev.bench.procstat import Probe
from stock_sync_dev.bench.queries import query_phase

DEFAULT_ORDERS = 2000
DEFAULT_COUNTED = 500
DEFAULT_CONTENTION = 1000
DEFAULT_LATENCY_OPS = 500
DEFAULT_ROWS = 1_000_000
QUICK = {"orders": 100, "counted": 50, "contention": 100, "latency_ops": 50, "rows": 10_000}
QUICK_SOAK_OPS = 200
MAKE_SOAK_OPS = 20_000  # what ``make soak`` runs
DEFAULT_POOL = "prefork"
DEFAULT_CONCURRENCY = 2
DEFAULT_QUERY_RUNS = 9


@dataclass(frozen=True)
class Options:
    orders: int
    counted: int
    contention: int
    latency_ops: int
    rows: int
    pool: str
    concurrency: int
    query_runs: int
    admin_url: str
    redis_url: str
    json_output: bool
    task_events: Literal["on", "off"] = "off"
    soak: int = 0
    soak_only: bool = False
    ratio_only: bool = False
    profile: str | None = None

    def shown(self) -> dict[str, Any]:
        return {
            name: value
            for name, value in asdict(self).items()
            if name not in ("admin_url", "redis_url")
        }


def _worker_settings(options: Options) -> str:
    return (
        f"{options.pool} pool, concurrency {options.concurrency}, task events {options.task_events}"
    )


def measure_ratio(options: Options, rig: phases.Rig, results: report.Results) -> float:
    """Phases 1 and 2 with a worker as users run it (nothing counted in it); the pipeline
    rate of phase 1."""
    log_path = rig.workdir / "worker-ratio.log"
    variables = worker_variables(rig.variables, None)
    with running_worker(variables, log_path, options.pool, options.concurrency) as worker:
        settings = _worker_settings(options)
        say(f"[ratio] {options.orders:,} chains and {options.orders:,} orders ({settings})")
        ratio = phases.ratio_phase(rig, worker, options.orders, profile=options.profile is not None)
        results.headline = report.headline(ratio, options.concurrency)
        say(results.headline)
        say(f"[batch] {options.orders:,} orders in one submit_operations call")
        batch = phases.batch_phase(rig, worker, options.orders)
        say(
            f"    {batch.producer.submit_rate:.0f} orders/s submitted, "
            f"{batch.ops_per_s:.1f} operations/s end to end"
        )
    results.cpu_table = report.cpu_table(
        [
            ("bare chain", ratio.bare.cpu, ratio.bare.chains),
            ("one by one", ratio.pipeline.cpu, ratio.pipeline.submitted),
            ("batch", batch.cpu, batch.submitted),
        ]
    )
    results.metrics += report.ratio_metrics(ratio) + report.batch_metrics(batch)
    return ratio.pipeline.ops_per_s


def measure_costs(options: Options, rig: phases.Rig, results: report.Results, rate: float) -> None:
    """Phases 3 to 6 with a worker whose SQL is counted (one mmap'd increment a statement)."""
    count_dir = rig.workdir / "worker-sql"
    variables = worker_variables(rig.variables, count_dir)
    log_path = rig.workdir / "worker-costs.log"
    with running_worker(variables, log_path, options.pool, options.concurrency) as worker:
        phases.warm_up(rig, worker)
        if options.soak_only:
            say(f"[soak] {options.soak:,} operations ({_worker_settings(options)})")
            soak = phases.soak_phase(rig, worker, options.soak)
            results.metrics += report.soak_metrics(soak)
            results.rss_samples = soak.samples
            return
        say(f"[counted] {options.counted:,} orders, SQL and HTTP counted")
        counted = phases.counted_phase(rig, worker, options.counted, count_dir)
        results.metrics += report.counted_metrics(counted)
        offered = max(rate / 2, 0.5)
        say(f"[latency] {options.latency_ops:,} orders submitted at {offered:.1f}/s")
        latency = phases.latency_phase(rig, worker, options.latency_ops, offered)
        say(
            f"    p50 {latency.percentile(0.5):.0f} ms, p95 {latency.percentile(0.95):.0f} ms, "
            f"p99 {latency.percentile(0.99):.0f} ms"
        )
        results.metrics += report.latency_metrics(latency)
        say(f"[contention] {options.contention:,} orders on distinct SKUs, then on one hot SKU")
        distinct = phases.distinct_skus_run(rig, worker, options.contention)
        say(f"    distinct SKUs: {distinct[0].ops_per_s:.1f} operations/s")
        hot = phases.hot_sku_run(rig, worker, options.contention)
        say(f"    hot SKU: {hot[0].ops_per_s:.1f} operations/s")
        results.metrics += report.contention_metrics(distinct, hot)
        if options.soak:
            say(f"[soak] {options.soak:,} operations")
            soak = phases.soak_phase(rig, worker, options.soak)
            say(f"    worker RSS slope {soak.slope_mb_per_10k():.2f} MB per 10,000 operations")
            results.metrics += report.soak_metrics(soak)
            results.rss_samples = soak.samples


def measurement_notes(options: Options, results: report.Results, probe: Probe) -> list[str]:
    effective = results.task_events_effective
    events = ", ".join(f"{name}={value}" for name, value in effective.items())
    notes = [
        f"worker: celery -A tasks worker --pool {options.pool} -c {options.concurrency} "
        f"--loglevel WARNING (mingle, gossip and heartbeat as by default); "
        f"{TASK_EVENTS_VARIABLE}={options.task_events}, which gives {events}",
        "rates: from the producer's first submit (its clock) to the last completion the worker "
        "recorded (completed_at / failed_at / cancelled_at in the database, the bare chain's "
        "last link in Redis); the harness polls every "
        f"{phases.POLL_S} s, which moves no rate",
        "CPU: utime+stime from /proc/<pid>/stat between the producer's go and the last "
        "completion; worker pool = live pool processes + reaped ones (cutime+cstime); "
        "PostgreSQL: the benchmark database's backends (pg_stat_activity) told apart by "
        "application_name"
        + (
            f"; redis-server pid {probe.redis_pid}"
            if probe.redis_pid
            else "; redis-server not visible from here (0)"
        )
        + ("" if probe.postmaster_pid else "; PostgreSQL's processes not visible from here (0)"),
    ]
    if not options.ratio_only and not options.soak_only:
        notes.append(
            "SQL statements and transactions counted by SQLAlchemy events in the worker and the "
            "producer (STOCK_SYNC_COUNT_SQL_DIR), in a second worker: the ratio's is not "
            "instrumented; HTTP requests counted by the fake (GET /_admin/requests)"
        )
    if options.soak and not options.ratio_only:
        notes.append(
            "soak: worker RSS = VmRSS of the parent + each pool process (shared pages counted "
            "in each: the level overstates, the slope is what matters)"
            + (
                f"; over {options.soak:,} operations the slope is mostly warm-up noise "
                f"(make soak runs {MAKE_SOAK_OPS:,})"
                if options.soak < MAKE_SOAK_OPS // 4
                else ""
            )
        )
    return notes


def run(options: Options) -> report.Results:
    """Every phase, with everything it starts stopped and removed before returning or raising."""
    results = report.Results(options.shown())
    with contextlib.ExitStack() as stack:
        rig, settings = start_rig(stack, options, results)
        results.notes = measurement_notes(options, results, rig.probe)
        say(results.notes[0])
        rate = 0.0 if options.soak_only else measure_ratio(options, rig, results)
        profile_folder = Path(options.profile) if options.profile else None
        if profile_folder is not None:
            results.profile_summary = profiling.summarise_folder(profile_folder)
            (profile_folder / "summary.txt").write_text(results.profile_summary + "\n")
        if not options.ratio_only:
            measure_costs(options, rig, results, rate)
        rig.fake.stop()
        if not (options.soak_only or options.ratio_only):
            say(f"[queries] {options.rows:,} finished operations")
            timings = query_phase(rig.database, settings, options.rows, options.query_runs)
            results.metrics += report.query_metrics(timings)
            results.sweep_plan = timings.sweep_plan
    return results


def start_rig(
    stack: contextlib.ExitStack, options: Options, results: report.Results
) -> tuple[phases.Rig, Settings]:
    """The run's database, fake microservice, Redis keys, SQL counter and probe, each removed
    by ``stack``; this process configured as the harness."""
    run_id = uuid.uuid4().hex[:8]
    queue = f"stock-sync-bench-{run_id}"
    done_prefix = f"stock-sync-bench:{run_id}:"
    client = redis.Redis.from_url(options.redis_url)
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stock-sync-bench-")))
    say("preparing: throwaway database, fake microservice")
    database_url = stack.enter_context(throwaway_database(options.admin_url))
    stack.callback(forget_redis_keys, client, queue, done_prefix)
    fake = FakeProcess(workdir / "fake.log")
    stack.callback(fake.stop)
    variables = run_environment(
        database_url, options.redis_url, fake.url, queue, workdir, options.task_events
    )
    settings = configure_this_process(harness_variables(variables))
    results.task_events_effective = effective_task_events()
    database_name = str(make_url(database_url).database)
    own_sql = LabelledSqlCounter(database_name)
    count_own_sql(own_sql)
    stack.callback(uninstall_sql_counter)
    database = Database(settings.effective_database_url)
    stack.callback(database.dispose)
    probe = Probe(options.admin_url, database_name, client)
    stack.callback(probe.close)
    rig = phases.Rig(
        client=client,
        variables=variables,
        fake=fake,
        database=database,
        workdir=workdir,
        done_prefix=done_prefix,
        probe=probe,
        own_sql=own_sql,
        profiler=profiler(options.profile),
    )
    return rig, settings


def effective_task_events() -> dict[str, bool]:
    """Whether the configured app sends task events (imported once this process is set up)."""
    from tasks.app import app

    return {
        "worker_send_task_events": bool(app.conf.worker_send_task_events),
        "task_send_sent_event": bool(app.conf.task_send_sent_event),
    }


def profiler(profile: str | None) -> Callable[[dict[str, list[int]]], Any] | None:
    """What records the ratio's profiles into the ``--profile`` folder, if one was given."""
    if not profile:
        return None
    folder = Path(profile)
    return lambda roles: profiling.recording(folder, roles)


# --- command line -------------------------------------------------------------------------


# (flag, option, default, help) of each size of the run
SIZES = (
    ("--orders", "orders", DEFAULT_ORDERS, "chains / orders of the ratio and the batch"),
    ("--counted", "counted", DEFAULT_COUNTED, "orders whose SQL and HTTP are counted"),
    ("--contention", "contention", DEFAULT_CONTENTION, "orders per contention run"),
    ("--latency-ops", "latency_ops", DEFAULT_LATENCY_OPS, "orders of the latency phase"),
    ("--rows", "rows", DEFAULT_ROWS, "finished operations for the query phase"),
)


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m stock_sync_dev.benchmark",
        description="Measure stock-sync's performance the way users run it, then its costs.",
    )
    _add_size_arguments(parser)
    _add_run_arguments(parser)
    _add_phase_arguments(parser)
    return _options_of(parser, parser.parse_args(argv))


def _add_size_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, name, default, text in SIZES:
        parser.add_argument(
            flag,
            dest=name,
            type=cli_args.positive_int,
            default=None,
            help=f"{text} (default {default:,}, {QUICK[name]:,} with --quick)",
        )
    parser.add_argument("--quick", action="store_true", help="everything sized down (smoke run)")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool", choices=("prefork", "threads"), default=DEFAULT_POOL)
    parser.add_argument("--concurrency", type=cli_args.positive_int, default=DEFAULT_CONCURRENCY)
    parser.add_argument(
        "--runs",
        type=cli_args.positive_int,
        default=DEFAULT_QUERY_RUNS,
        help="timed runs per query (the median is reported)",
    )
    cli_args.add_postgres_url(parser)
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help=f"the broker (default {DEFAULT_REDIS_URL}: a database of its own, out of reach "
        "of other workers' remote control and events)",
    )


def _add_phase_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        dest="json_output",
        action="store_true",
        help="print the results as JSON on stdout (the tables go to stderr)",
    )
    parser.add_argument(
        "--task-events",
        choices=("on", "off"),
        default="off",
        help=f"Celery task events for the worker and the producers, through "
        f"{TASK_EVENTS_VARIABLE} (default off)",
    )
    parser.add_argument(
        "--soak",
        type=cli_args.not_negative_int,
        default=None,
        help=f"operations of the soak phase, 0 for none (default 0, {QUICK_SOAK_OPS} with "
        f"--quick; make soak runs {MAKE_SOAK_OPS:,})",
    )
    parser.add_argument(
        "--soak-only",
        action="store_true",
        help=f"run the soak alone (default {MAKE_SOAK_OPS:,} operations): no other phase",
    )
    parser.add_argument(
        "--ratio-only",
        action="store_true",
        help="the ratio and the batch alone (phases 1 and 2)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="py-spy profiles (raw collapsed stacks) of the worker's processes and the "
        "producer during the ratio's pipeline run, written to DIR with a summary",
    )


def _options_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Options:
    soak = args.soak
    if soak is None:
        soak = MAKE_SOAK_OPS if args.soak_only else QUICK_SOAK_OPS if args.quick else 0
    if args.soak_only and soak == 0:
        parser.error("--soak-only needs a soak of at least one operation")
    if args.soak_only and args.ratio_only:
        parser.error("--soak-only and --ratio-only exclude each other")
    size = {
        name: getattr(args, name) or (QUICK[name] if args.quick else default)
        for _, name, default, _ in SIZES
    }
    return cli_args.options_of(Options, args, query_runs=args.runs, soak=soak, **size)


def main(argv: Sequence[str] | None = None) -> int:
    """0 when measured (targets missed or not), 1 on an error, 130 when interrupted."""
    options = parse_options(argv)
    signal.signal(signal.SIGTERM, cli_args.interrupt_on_sigterm)
    try:
        results = run(options)
    except KeyboardInterrupt:
        say("interrupted; everything the benchmark started was stopped")
        return 130
    except BenchmarkError as error:
        say(f"benchmark failed: {error}")
        return 1
    report.report(results, options.json_output)
    return 0

"""Health and readiness: is this deployment able to do its work right now?

Checks, each a plain function returning a :class:`CheckResult` (never raising):

- ``database``: reachable, and at the migration head (a database behind the code is not ready);
- ``broker``: a kombu connection to the broker URL answers;
- ``microservice``: its base URL gives any HTTP answer (a GET of the base URL, which is no
  endpoint of the contract: it reads and changes nothing on the marketplace);
- ``worker``: the heartbeat file of the worker on this host is fresh (no broker, no database:
  stock_sync/adapters/heartbeat.py); no file is a warning in the full report (no worker runs
  here), a failure when the worker check is asked for alone (the worker's own healthcheck);
- ``beat``: beat sent a scheduled entry recently (beat records each send itself, so a beat
  whose tasks nobody runs is not blamed for it);
- ``maintenance``: the stuck sweep, the release of parked retries and the alert evaluation
  ran recently enough (recorded by the worker that ran each: a worker consumes the maintenance
  queue);
- ``embedded_default``: a loud WARNING when the database is the embedded SQLite file or the
  broker Celery's filesystem transport: fine for the demo, never for production. A warning
  does not make the deployment unready (the demo is a legitimate deployment of it).

Readiness is per process: the metrics server's ``/readyz`` asks its database alone; the
microservice's reachability is a metric and an alert (``stock_sync_microservice_up``), never
anyone's readiness.

:func:`run_health_checks` runs them concurrently, each in a daemon thread with its own short
timeout, so a hung check costs its timeout and never delays or hides the others. A failure is
a check result with a one-line reason, passwords masked: never a traceback.

The questions themselves (a connection, a GET, a file read) are asked by
stock_sync/adapters/probes.py and stock_sync/adapters/heartbeat.py; this module judges the
answers. The metrics server's ``/readyz`` serves :func:`run_health_checks` over WSGI
(stock_sync/entrypoints/metrics_server.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from stock_sync.adapters.heartbeat import read_heartbeat
from stock_sync.adapters.maintenance_runs import ALERTS, BEAT, RELEASE, SWEEP, LastRun
from stock_sync.adapters.probes import (
    Unreachable,
    connect_broker,
    database_revision,
    describe_database_failure,
    http_status,
    maintenance_runs,
)
from stock_sync.adapters.redaction import one_line, redact, redact_url
from stock_sync.adapters.settings import Settings

logger = logging.getLogger("stock_sync.health")

OK = "ok"
WARNING = "warning"
FAILED = "failed"

DATABASE = "database"
BROKER = "broker"
MICROSERVICE = "microservice"
WORKER = "worker"
BEAT_CHECK = BEAT
MAINTENANCE = "maintenance"
EMBEDDED_DEFAULT = "embedded_default"
CHECK_NAMES = (DATABASE, BROKER, MICROSERVICE, WORKER, BEAT_CHECK, MAINTENANCE, EMBEDDED_DEFAULT)

DEFAULT_TIMEOUT_S = 3.0
# Past its own timeout a check gets this much more before it is reported as hung: the
# libraries' timeouts are per step (connect, then read), not for the whole check.
HUNG_GRACE_S = 1.0
# Beat is alive when it sent an entry within this many of its shortest interval, and a
# maintenance task when it finished within this many of its own, and at least a minute: one
# late or expired run (a busy worker, a broker restart) is no alarm.
STALE_AFTER_INTERVALS = 3
MIN_STALE_AFTER_S = 60.0
# The metrics server's probe of the microservice (stock_sync_microservice_up): short, and
# shared by the scrapes of this long.
MICROSERVICE_PROBE_TIMEOUT_S = 2.0
MICROSERVICE_PROBE_CACHE_S = 15.0

EMBEDDED_WARNING = (
    "WARNING: running on the embedded default ({parts}): a single-host demo set-up, not for "
    "production; set STOCK_SYNC_DATABASE_URL (PostgreSQL) and STOCK_SYNC_BROKER_URL (Redis)"
)


@dataclass(frozen=True)
class CheckResult:
    """One check: ``status`` is ok, warning or failed; ``detail`` one line for an operator;
    ``data`` the figures behind it, for machines."""

    name: str
    status: str
    detail: str
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, **self.data}


@dataclass(frozen=True)
class HealthReport:
    """Every check that ran, in :data:`CHECK_NAMES` order."""

    checks: tuple[CheckResult, ...]
    checked_at: datetime

    @property
    def ready(self) -> bool:
        """No check failed (warnings allowed)."""
        return all(check.status != FAILED for check in self.checks)

    @property
    def status(self) -> str:
        return worst(check.status for check in self.checks)

    @property
    def failed(self) -> list[str]:
        return [check.name for check in self.checks if check.status == FAILED]

    def check(self, name: str) -> CheckResult | None:
        return next((check for check in self.checks if check.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "status": self.status,
            "checked_at": self.checked_at.isoformat(),
            "checks": [check.to_dict() for check in self.checks],
        }


Check = Callable[[Settings, datetime, float], CheckResult]


def run_health_checks(
    settings: Settings,
    *,
    now: datetime | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    only: Collection[str] | None = None,
) -> HealthReport:
    """Run the checks named in ``only`` (all by default) concurrently; ``now`` is when the
    beat, maintenance and worker checks measure ages from. Takes at most about ``timeout_s``
    + 1 s, whatever hangs. The worker check asked for by name needs a heartbeat file."""
    now = now or datetime.now(UTC)
    names = [name for name in CHECK_NAMES if only is None or name in only]
    unknown = set(only or ()) - set(CHECK_NAMES)
    if unknown:
        raise ValueError(f"unknown health check(s): {', '.join(sorted(unknown))}")
    checks = {name: CHECKS[name] for name in names}
    if only is not None and WORKER in only:
        checks[WORKER] = check_this_hosts_worker
    return HealthReport(_run_isolated(checks, settings, now, timeout_s), checked_at=now)


def _run_isolated(
    checks: Mapping[str, Check], settings: Settings, now: datetime, timeout_s: float
) -> tuple[CheckResult, ...]:
    results: dict[str, CheckResult] = {}
    secrets = settings.secrets()

    def run(name: str, check: Check) -> None:
        try:
            result = check(settings, now, timeout_s)
        except Exception as error:  # a check must never take the others down with it
            first_line = (str(error).strip().splitlines() or [""])[0]
            result = CheckResult(name, FAILED, f"unexpected {type(error).__name__}: {first_line}")
        # One line, passwords masked, whatever a library put in its message.
        results[name] = CheckResult(
            name, result.status, one_line(redact(result.detail, secrets)), result.data
        )

    # Daemon threads: a check stuck past every timeout must not keep the process alive.
    threads = [
        threading.Thread(target=run, args=item, name=f"health-{item[0]}", daemon=True)
        for item in checks.items()
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s + HUNG_GRACE_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    found = dict(results)  # a late thread may still write: read each answer once
    return tuple(
        found.get(name) or CheckResult(name, FAILED, f"no answer within {timeout_s:g} s")
        for name in checks
    )


# --- database ---------------------------------------------------------------------------------


def check_database(settings: Settings, _now: datetime, timeout_s: float) -> CheckResult:
    """Reachable and at the migration head."""
    where = redact_url(settings.effective_database_url)
    try:
        state = database_revision(settings, timeout_s)
    except Exception as error:
        return CheckResult(DATABASE, FAILED, describe_database_failure(error, settings))
    data = {"current": list(state.current), "heads": list(state.heads)}
    heads = ", ".join(state.heads)
    current = ", ".join(state.current)
    if not state.current:
        problem = f"has no schema (head {heads})"
    elif not state.is_head:
        problem = f"is at revision {current}, not at the head {heads}"
    else:
        return CheckResult(DATABASE, OK, f"{where} at revision {current} (head)", data)
    return CheckResult(DATABASE, FAILED, f"{where} {problem}: run 'stock-sync db upgrade'", data)


# --- broker -----------------------------------------------------------------------------------


def check_broker(settings: Settings, _now: datetime, timeout_s: float) -> CheckResult:
    """A kombu connection to the broker answers (the filesystem transport: its folder exists)."""
    if settings.uses_filesystem_broker:
        folder = settings.broker_folder / "queue"
        if folder.is_dir():
            return CheckResult(BROKER, OK, f"filesystem transport at {folder}")
        detail = f"filesystem transport: no queue folder at {folder} (no worker started here yet)"
        return CheckResult(BROKER, FAILED, detail)
    url = settings.effective_broker_url
    where = redact_url(url)
    try:
        connect_broker(url, timeout_s)
    except Exception as error:
        return CheckResult(BROKER, FAILED, f"cannot reach the broker at {where}: {error}")
    return CheckResult(BROKER, OK, f"{where} answers")


# --- microservice -----------------------------------------------------------------------------


def check_microservice(settings: Settings, _now: datetime, timeout_s: float) -> CheckResult:
    """Any HTTP answer from the base URL counts; a 5xx is a warning (reachable, but a proxy
    or the wrapper itself reports an error)."""
    url = settings.microservice_url
    where = redact_url(url)
    try:
        status = http_status(url, timeout_s)
    except Unreachable as error:
        return CheckResult(MICROSERVICE, FAILED, f"cannot reach {where}: {error}")
    data = {"http_status": status}
    if status >= 500:
        detail = f"{where} answers HTTP {status} (a server error)"
        return CheckResult(MICROSERVICE, WARNING, detail, data)
    return CheckResult(MICROSERVICE, OK, f"{where} answers (HTTP {status})", data)


def microservice_up(settings: Settings, timeout_s: float = MICROSERVICE_PROBE_TIMEOUT_S) -> bool:
    """Whether the microservice answers below 500 (a 5xx is often a proxy in front of a
    wrapper that is down): ``stock_sync_microservice_up``."""
    return check_microservice(settings, datetime.now(UTC), timeout_s).status == OK


# --- ages ------------------------------------------------------------------------------------


def allowed_age_s(interval_s: float) -> float:
    """How old the last run of a task scheduled every ``interval_s`` may be."""
    return max(STALE_AFTER_INTERVALS * interval_s, MIN_STALE_AFTER_S)


def beat_allowed_age_s(settings: Settings) -> float:
    """How long ago beat may have sent its last entry: three of its shortest interval."""
    shortest = min(
        settings.sweep_interval_s, settings.alert_interval_s, settings.retry_release_interval_s
    )
    return allowed_age_s(shortest)


def describe_age(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 5 min``, ``2 d 4 h``."""
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if hours < 2:
        return f"{minutes} min"
    if days < 2:
        return f"{hours} h {minutes % 60} min"
    return f"{days} d {hours % 24} h"


def _age_s(now: datetime, moment: datetime) -> float:
    return max(0.0, (now - moment).total_seconds())


def _timing(key: str, moment: datetime, age: float, allowed: float) -> dict[str, Any]:
    """The figures of a check measured by age: when (under ``key``), how old, how old allowed."""
    return {key: moment.isoformat(), "age_s": round(age, 1), "allowed_s": allowed}


def worst(statuses: Iterable[str]) -> str:
    """Failed over warning over ok."""
    found = set(statuses)
    return FAILED if FAILED in found else WARNING if WARNING in found else OK


# --- worker ---------------------------------------------------------------------------------


def check_worker(
    settings: Settings, now: datetime, _timeout_s: float, *, required: bool = False
) -> CheckResult:
    """The heartbeat file of this host's worker is younger than three of its intervals."""
    path = settings.effective_worker_heartbeat_file
    try:
        heartbeat = read_heartbeat(path)
    except ValueError as error:
        return CheckResult(WORKER, FAILED, f"unreadable heartbeat file {path}: {error}")
    if heartbeat is None:
        detail = (
            f"no worker heartbeat at {path}: no worker runs on this host"
            " (or it writes STOCK_SYNC_WORKER_HEARTBEAT_FILE elsewhere)"
        )
        return CheckResult(WORKER, FAILED if required else WARNING, detail, {"file": str(path)})
    age, allowed = _age_s(now, heartbeat.written_at), heartbeat.stale_after_s
    worker = f"worker {heartbeat.node or '?'} (pid {heartbeat.pid})"
    data = {
        "file": str(path),
        "node": heartbeat.node,
        "pid": heartbeat.pid,
        **_timing("written_at", heartbeat.written_at, age, allowed),
    }
    if age > allowed:
        detail = (
            f"{worker} last beat {describe_age(age)} ago (allowed {describe_age(allowed)}):"
            " it is hung or was killed"
        )
        return CheckResult(WORKER, FAILED, detail, data)
    return CheckResult(WORKER, OK, f"{worker} beat {describe_age(age)} ago", data)


def check_this_hosts_worker(settings: Settings, now: datetime, timeout_s: float) -> CheckResult:
    """:func:`check_worker` where a missing heartbeat file is a failure (the worker's own
    healthcheck: ``stock-sync health --only worker``)."""
    return check_worker(settings, now, timeout_s, required=True)


# --- beat and the maintenance tasks -----------------------------------------------------------

MAINTENANCE_LABELS = {
    SWEEP: "sweep",
    RELEASE: "release of parked retries",
    ALERTS: "alert evaluation",
}


def check_beat(settings: Settings, now: datetime, timeout_s: float) -> CheckResult:
    """Beat sent a scheduled entry within :func:`beat_allowed_age_s` (its own record: whether
    a worker ran it is the maintenance check's question)."""
    try:
        sent = maintenance_runs(settings, timeout_s).get(BEAT)
    except Exception as error:
        detail = f"cannot read beat's last send: {describe_database_failure(error, settings)}"
        return CheckResult(BEAT_CHECK, FAILED, detail)
    allowed = beat_allowed_age_s(settings)
    if sent is None:
        detail = "beat never recorded a send: is beat running (celery -A tasks beat)?"
        return CheckResult(BEAT_CHECK, FAILED, detail, {"sent_at": None, "allowed_s": allowed})
    age = _age_s(now, sent.finished_at)
    entry = sent.summary.get("entry", "an entry")
    data = {**_timing("sent_at", sent.finished_at, age, allowed), "entry": entry, "host": sent.host}
    if age > allowed:
        detail = (
            f"beat last sent {entry} {describe_age(age)} ago on {sent.host} (allowed "
            f"{describe_age(allowed)}): is beat running, and can it reach the broker?"
        )
        return CheckResult(BEAT_CHECK, FAILED, detail, data)
    return CheckResult(BEAT_CHECK, OK, f"sent {entry} {describe_age(age)} ago", data)


def judge_maintenance_run(
    label: str, run: LastRun | None, now: datetime, allowed: float
) -> tuple[str, str, dict[str, Any]]:
    """One maintenance task's verdict: its status, its part of the detail, its figures."""
    if run is None:
        data: dict[str, Any] = {
            "finished_at": None,
            "age_s": None,
            "allowed_s": allowed,
            "ok": None,
        }
        return FAILED, f"the {label} never ran", data
    age = _age_s(now, run.finished_at)
    data = {**_timing("finished_at", run.finished_at, age, allowed), "ok": run.ok, "host": run.host}
    if age > allowed:
        ago = f"{describe_age(age)} ago (allowed {describe_age(allowed)})"
        return FAILED, f"the last {label} was {ago}", data
    if not run.ok:
        reason = run.summary.get("error", "an error")
        return WARNING, f"the last {label}, {describe_age(age)} ago, failed: {reason}", data
    return OK, f"{label} {describe_age(age)} ago", data


def check_maintenance(settings: Settings, now: datetime, timeout_s: float) -> CheckResult:
    """The stuck sweep, the release of parked retries and the alert evaluation each finished
    within :func:`allowed_age_s` of their interval."""
    try:
        runs = maintenance_runs(settings, timeout_s)
    except Exception as error:
        detail = f"cannot read the maintenance runs: {describe_database_failure(error, settings)}"
        return CheckResult(MAINTENANCE, FAILED, detail)
    intervals = {
        SWEEP: settings.sweep_interval_s,
        RELEASE: settings.retry_release_interval_s,
        ALERTS: settings.alert_interval_s,
    }
    verdicts = {
        task: judge_maintenance_run(
            MAINTENANCE_LABELS[task], runs.get(task), now, allowed_age_s(interval)
        )
        for task, interval in intervals.items()
    }
    status = worst(verdict[0] for verdict in verdicts.values())
    detail = "; ".join(verdict[1] for verdict in verdicts.values())
    if status == FAILED:
        queue = settings.effective_maintenance_queue_name
        detail += f": is a worker consuming the queue {queue} (and beat running)?"
    return CheckResult(MAINTENANCE, status, detail, {task: v[2] for task, v in verdicts.items()})


# --- the embedded default ---------------------------------------------------------------------


def embedded_parts(settings: Settings) -> list[str]:
    """What of the embedded default is in use: its SQLite database, its filesystem broker."""
    parts = []
    if settings.uses_sqlite_database:
        parts.append("SQLite database")
    if settings.uses_filesystem_broker:
        parts.append("filesystem broker")
    return parts


def embedded_warning(settings: Settings) -> str | None:
    """The loud line to show when the settings use the embedded default, else None."""
    parts = embedded_parts(settings)
    return EMBEDDED_WARNING.format(parts=" and ".join(parts)) if parts else None


def check_embedded_default(settings: Settings, _now: datetime, _timeout_s: float) -> CheckResult:
    warning = embedded_warning(settings)
    if warning is None:
        return CheckResult(EMBEDDED_DEFAULT, OK, "PostgreSQL and a broker server are configured")
    return CheckResult(EMBEDDED_DEFAULT, WARNING, warning.removeprefix("WARNING: "))


CHECKS: dict[str, Check] = {
    DATABASE: check_database,
    BROKER: check_broker,
    MICROSERVICE: check_microservice,
    WORKER: check_worker,
    BEAT_CHECK: check_beat,
    MAINTENANCE: check_maintenance,
    EMBEDDED_DEFAULT: check_embedded_default,
}


def log_embedded_warning(settings: Settings, process: str) -> None:
    """One WARNING record when ``process`` (the worker) starts on the embedded default."""
    warning = embedded_warning(settings)
    if warning is not None:
        logger.warning(
            "%s %s",
            process,
            warning.removeprefix("WARNING: "),
            extra={"action": "embedded_default", "embedded": embedded_parts(settings)},
        )

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
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from stock_sync.adapters.db import describe_database_error, normalise_database_url
from stock_sync.adapters.heartbeat import read_heartbeat
from stock_sync.adapters.maintenance_runs import ALERTS, BEAT, RELEASE, SWEEP, LastRun, last_runs
from stock_sync.adapters.redaction import one_line, redact, redact_url
from stock_sync.adapters.settings import Settings, database_kind

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
        statuses = {check.status for check in self.checks}
        return FAILED if FAILED in statuses else WARNING if WARNING in statuses else OK

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


def _probe_engine(settings: Settings, timeout_s: float) -> Engine:
    """An engine of its own for one check: no pool, short connect and statement timeouts."""
    url = normalise_database_url(settings.effective_database_url)
    if database_kind(url) == "sqlite":
        database = make_url(url).database or ""
        if database and database != ":memory:" and not Path(database).exists():
            # Connecting would create an empty file: a health check must change nothing.
            raise FileNotFoundError(f"no database file at {database}: run 'stock-sync db upgrade'")
        return create_engine(url, poolclass=NullPool, connect_args={"timeout": timeout_s})
    return create_engine(
        url,
        poolclass=NullPool,
        # libpq takes whole seconds (and at least 2)
        connect_args={"connect_timeout": max(2, round(timeout_s))},
    )


def _limit_statements(connection: Connection, timeout_s: float) -> None:
    """A statement timeout for this transaction only: SET LOCAL rather than a startup
    ``options`` parameter, which PgBouncer refuses unless told to ignore it."""
    if connection.dialect.name == "postgresql":
        connection.execute(text(f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}"))


@contextlib.contextmanager
def _probe(settings: Settings, timeout_s: float) -> Iterator[Engine]:
    engine = _probe_engine(settings, timeout_s)
    try:
        yield engine
    finally:
        engine.dispose()


def _database_failure(error: Exception, settings: Settings) -> str:
    if isinstance(error, SQLAlchemyError):
        return describe_database_error(error, settings.effective_database_url)
    if isinstance(error, FileNotFoundError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def check_database(settings: Settings, _now: datetime, timeout_s: float) -> CheckResult:
    """Reachable and at the migration head."""
    # imported here: alembic costs every worker ~80 ms at start, and only this check needs it
    from stock_sync.adapters.schema import revision_of

    where = redact_url(settings.effective_database_url)
    try:
        with _probe(settings, timeout_s) as engine, engine.connect() as connection:
            _limit_statements(connection, timeout_s)
            state = revision_of(connection)
    except Exception as error:
        return CheckResult(DATABASE, FAILED, _database_failure(error, settings))
    data = {"current": list(state.current), "heads": list(state.heads)}
    heads = ", ".join(state.heads)
    if not state.current:
        detail = f"{where} has no schema (head {heads}): run 'stock-sync db upgrade'"
        return CheckResult(DATABASE, FAILED, detail, data)
    current = ", ".join(state.current)
    if not state.is_head:
        detail = (
            f"{where} is at revision {current}, not at the head {heads}: "
            "run 'stock-sync db upgrade'"
        )
        return CheckResult(DATABASE, FAILED, detail, data)
    return CheckResult(DATABASE, OK, f"{where} at revision {current} (head)", data)


# --- broker -----------------------------------------------------------------------------------


def check_broker(settings: Settings, _now: datetime, timeout_s: float) -> CheckResult:
    """A kombu connection to the broker answers (the filesystem transport: its folder exists)."""
    if settings.uses_filesystem_broker:
        folder = settings.broker_folder / "queue"
        if folder.is_dir():
            return CheckResult(BROKER, OK, f"filesystem transport at {folder}")
        detail = f"filesystem transport: no queue folder at {folder} (no worker started here yet)"
        return CheckResult(BROKER, FAILED, detail)
    from kombu.connection import Connection

    connect: Any = Connection  # kombu is untyped
    url = settings.effective_broker_url
    where = redact_url(url)

    options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    try:
        with connect(url, connect_timeout=timeout_s, transport_options=options) as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, interval_max=0, timeout=timeout_s
            )
    except Exception as error:
        return CheckResult(BROKER, FAILED, f"cannot reach the broker at {where}: {error}")
    return CheckResult(BROKER, OK, f"{where} answers")


# --- microservice -----------------------------------------------------------------------------

_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")\]]+")


def _connection_problem(error: Exception) -> str:
    """The telling part of a requests error (its message nests urllib3's several deep)."""
    import requests

    if isinstance(error, requests.Timeout):
        return "no answer in time"
    found = _ERRNO.search(str(error))
    return found.group(0).strip() if found else type(error).__name__


def check_microservice(settings: Settings, _now: datetime, timeout_s: float) -> CheckResult:
    """Any HTTP answer from the base URL counts; a 5xx is a warning (reachable, but a proxy
    or the wrapper itself reports an error)."""
    import requests

    url = settings.microservice_url
    where = redact_url(url)
    with requests.Session() as session:
        session.trust_env = False  # as the microservice client: no proxy the worker would skip
        try:
            answer = session.get(
                url, timeout=(min(timeout_s, 3.0), timeout_s), allow_redirects=False, stream=True
            )
            answer.close()
        except requests.RequestException as error:
            detail = f"cannot reach {where}: {_connection_problem(error)}"
            return CheckResult(MICROSERVICE, FAILED, detail)
    data = {"http_status": answer.status_code}
    if answer.status_code >= 500:
        detail = f"{where} answers HTTP {answer.status_code} (a server error)"
        return CheckResult(MICROSERVICE, WARNING, detail, data)
    return CheckResult(MICROSERVICE, OK, f"{where} answers (HTTP {answer.status_code})", data)


def microservice_up(settings: Settings, timeout_s: float = MICROSERVICE_PROBE_TIMEOUT_S) -> bool:
    """Whether the microservice answers below 500 (a 5xx is often a proxy in front of a
    wrapper that is down): ``stock_sync_microservice_up``."""
    return check_microservice(settings, datetime.now(UTC), timeout_s).status == OK


class CachedProbe:
    """Runs ``probe`` at most once every ``max_age_s`` seconds; callers meanwhile (and those
    arriving while it runs) share its answer. Thread-safe."""

    def __init__(
        self,
        probe: Callable[[], bool],
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._answer: bool | None = None
        self._asked_at = 0.0

    def get(self) -> bool:
        with self._lock:
            if self._answer is None or self._clock() - self._asked_at >= self._max_age_s:
                self._answer = self._probe()
                self._asked_at = self._clock()
            return self._answer


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
    age = max(0.0, (now - heartbeat.written_at).total_seconds())
    allowed = heartbeat.stale_after_s
    worker = f"worker {heartbeat.node or '?'} (pid {heartbeat.pid})"
    data = {
        "file": str(path),
        "node": heartbeat.node,
        "pid": heartbeat.pid,
        "written_at": heartbeat.written_at.isoformat(),
        "age_s": round(age, 1),
        "allowed_s": allowed,
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


def _read_runs(settings: Settings, timeout_s: float) -> dict[str, LastRun]:
    with _probe(settings, timeout_s) as engine, Session(engine) as session:
        _limit_statements(session.connection(), timeout_s)
        return last_runs(session)


def check_beat(settings: Settings, now: datetime, timeout_s: float) -> CheckResult:
    """Beat sent a scheduled entry within :func:`beat_allowed_age_s` (its own record: whether
    a worker ran it is the maintenance check's question)."""
    try:
        sent = _read_runs(settings, timeout_s).get(BEAT)
    except Exception as error:
        detail = f"cannot read beat's last send: {_database_failure(error, settings)}"
        return CheckResult(BEAT_CHECK, FAILED, detail)
    allowed = beat_allowed_age_s(settings)
    if sent is None:
        detail = "beat never recorded a send: is beat running (celery -A tasks beat)?"
        return CheckResult(BEAT_CHECK, FAILED, detail, {"sent_at": None, "allowed_s": allowed})
    age = max(0.0, (now - sent.finished_at).total_seconds())
    entry = sent.summary.get("entry", "an entry")
    data = {
        "sent_at": sent.finished_at.isoformat(),
        "age_s": round(age, 1),
        "allowed_s": allowed,
        "entry": entry,
        "host": sent.host,
    }
    if age > allowed:
        detail = (
            f"beat last sent {entry} {describe_age(age)} ago on {sent.host} (allowed "
            f"{describe_age(allowed)}): is beat running, and can it reach the broker?"
        )
        return CheckResult(BEAT_CHECK, FAILED, detail, data)
    return CheckResult(BEAT_CHECK, OK, f"sent {entry} {describe_age(age)} ago", data)


def check_maintenance(settings: Settings, now: datetime, timeout_s: float) -> CheckResult:
    """The stuck sweep, the release of parked retries and the alert evaluation each finished
    within :func:`allowed_age_s` of their interval."""
    try:
        runs = _read_runs(settings, timeout_s)
    except Exception as error:
        detail = f"cannot read the maintenance runs: {_database_failure(error, settings)}"
        return CheckResult(MAINTENANCE, FAILED, detail)
    intervals = {
        SWEEP: settings.sweep_interval_s,
        RELEASE: settings.retry_release_interval_s,
        ALERTS: settings.alert_interval_s,
    }
    labels = {SWEEP: "sweep", RELEASE: "release of parked retries", ALERTS: "alert evaluation"}
    status, parts, data = OK, [], dict[str, dict[str, Any]]()
    for task, interval in intervals.items():
        allowed, run = allowed_age_s(interval), runs.get(task)
        if run is None:
            status = FAILED
            parts.append(f"the {labels[task]} never ran")
            data[task] = {"finished_at": None, "age_s": None, "allowed_s": allowed, "ok": None}
            continue
        age = max(0.0, (now - run.finished_at).total_seconds())
        data[task] = {
            "finished_at": run.finished_at.isoformat(),
            "age_s": round(age, 1),
            "allowed_s": allowed,
            "ok": run.ok,
            "host": run.host,
        }
        if age > allowed:
            status = FAILED
            parts.append(
                f"the last {labels[task]} was {describe_age(age)} ago "
                f"(allowed {describe_age(allowed)})"
            )
        elif not run.ok:
            status = WARNING if status == OK else status
            reason = run.summary.get("error", "an error")
            parts.append(f"the last {labels[task]}, {describe_age(age)} ago, failed: {reason}")
        else:
            parts.append(f"{labels[task]} {describe_age(age)} ago")
    detail = "; ".join(parts)
    if status == FAILED:
        queue = settings.effective_maintenance_queue_name
        detail += f": is a worker consuming the queue {queue} (and beat running)?"
    return CheckResult(MAINTENANCE, status, detail, data)


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


# --- readiness over WSGI ----------------------------------------------------------------------

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def readiness_app(
    settings: Settings,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    only: Collection[str] | None = None,
) -> WsgiApp:
    """A WSGI app for ``/readyz``: 200 and the JSON report when ready, 503 when a check
    failed, 405 for anything but GET and HEAD. Requests arriving while a run is under way
    share its report, so a burst of probes opens one set of connections, not one per probe."""
    lock = threading.Lock()
    latest: list[tuple[float, HealthReport]] = []  # (when it finished, the report)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response(
                "405 Method Not Allowed",
                [("Content-Type", "text/plain; charset=utf-8"), ("Allow", "GET, HEAD")],
            )
            return [b"method not allowed\n"]
        arrived = time.monotonic()
        with lock:
            if latest and latest[0][0] >= arrived:
                report = latest[0][1]  # finished while this request waited for it
            else:
                report = run_health_checks(settings, timeout_s=timeout_s, only=only)
                latest[:] = [(time.monotonic(), report)]
        body = (json.dumps(report.to_dict()) + "\n").encode()
        status = "200 OK" if report.ready else "503 Service Unavailable"
        start_response(
            status,
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [] if method == "HEAD" else [body]

    return app

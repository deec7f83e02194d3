"""`stock-sync health` and /readyz against real PostgreSQL, Redis and the fake microservice
over HTTP; the worker's embedded-default warning from a real worker process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from stock_sync.adapters import schema
from stock_sync.adapters.db import Database
from stock_sync.adapters.heartbeat import Heartbeat, write_heartbeat
from stock_sync.adapters.maintenance_runs import (
    ALERTS,
    RELEASE,
    SWEEP,
    last_runs,
    record_beat_send,
    recorded_run,
)
from stock_sync.adapters.maintenance_runs import BEAT as BEAT_ROW
from stock_sync.adapters.models import utcnow
from stock_sync.adapters.settings import Settings
from stock_sync.entrypoints.metrics_server import make_metrics_server, readiness_app
from stock_sync.services import health
from stock_sync.services.health import (
    BEAT,
    BROKER,
    CHECK_NAMES,
    DATABASE,
    EMBEDDED_DEFAULT,
    FAILED,
    MAINTENANCE,
    MICROSERVICE,
    OK,
    WARNING,
    WORKER,
    run_health_checks,
)
from stock_sync_fake import FakeMicroservice
from tests import celery_processes
from tests.conftest import REDIS_URL, run_queue_name

CLI = str(Path(sys.executable).with_name("stock-sync"))
PASSWORD = "Sup3rSecretPw"


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_for(database_url: str, fake: FakeMicroservice, **overrides: Any) -> Settings:
    values = {
        "database_url": database_url,
        "broker_url": REDIS_URL,
        "microservice_url": fake.url,
        **overrides,
    }
    return Settings(**values)


def environment_of(settings: Settings) -> dict[str, str]:
    """The process environment for ``settings``: none of this process's STOCK_SYNC_* leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCK_SYNC_")}
    env.update(
        STOCK_SYNC_DATABASE_URL=settings.database_url,
        STOCK_SYNC_BROKER_URL=settings.broker_url,
        STOCK_SYNC_MICROSERVICE_URL=settings.microservice_url,
        STOCK_SYNC_DATA_DIR=str(settings.data_dir),
        STOCK_SYNC_WORKER_HEARTBEAT_FILE=str(settings.effective_worker_heartbeat_file),
        STOCK_SYNC_EMBEDDED="1" if settings.embedded else "0",
    )
    return env


def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "health", *args],
        capture_output=True,
        text=True,
        env=environment_of(settings),
        timeout=60,
    )


def record_maintenance_runs(database: Database) -> None:
    for task in (SWEEP, RELEASE, ALERTS):
        with recorded_run(database, task) as run:
            run.summary = {"redriven": 0}


def beat_sent_now(database: Database) -> None:
    record_beat_send(database, "release-due-retries", "stock_sync.release_due_retries", utcnow())


def worker_beat_now(settings: Settings, pid: int = 4242) -> None:
    heartbeat = Heartbeat(utcnow(), pid, "celery@test-host", settings.worker_heartbeat_interval_s)
    write_heartbeat(settings.effective_worker_heartbeat_file, heartbeat)


def statuses(report: health.HealthReport) -> dict[str, str]:
    return {check.name: check.status for check in report.checks}


@pytest.fixture
def healthy(
    clean_database: Database,
    postgres_url: str,
    fake_microservice: FakeMicroservice,
    tmp_path: Path,
) -> Settings:
    """A migrated database where beat sent an entry and the maintenance tasks ran just now,
    Redis, the fake microservice, and a worker's fresh heartbeat file."""
    record_maintenance_runs(clean_database)
    beat_sent_now(clean_database)
    heartbeat_file = tmp_path / "run" / "worker.heartbeat"
    settings = settings_for(
        postgres_url, fake_microservice, worker_heartbeat_file=str(heartbeat_file)
    )
    worker_beat_now(settings)
    return settings


def database_behind_closed_port(fake: FakeMicroservice, tmp_path: Path) -> Settings:
    url = f"postgresql://stock_sync:{PASSWORD}@127.0.0.1:{closed_port()}/stock_sync"
    return settings_for(url, fake, data_dir=tmp_path)


# --- the healthy case ---------------------------------------------------------------------------


def test_a_healthy_deployment_is_ready_with_every_check_ok(healthy: Settings) -> None:
    report = run_health_checks(healthy)

    assert statuses(report) == dict.fromkeys(CHECK_NAMES, OK)
    assert report.ready
    maintenance = report.check(MAINTENANCE)
    assert maintenance is not None and set(maintenance.data) == {SWEEP, RELEASE, ALERTS}


def test_the_health_command_exits_0_and_prints_the_report_as_json(healthy: Settings) -> None:
    result = run_cli(healthy, "--json")

    assert result.returncode == 0, result.stdout + result.stderr
    payload = json.loads(result.stdout)
    assert payload["ready"] is True and payload["status"] == OK
    assert [check["name"] for check in payload["checks"]] == list(CHECK_NAMES)
    for check in payload["checks"]:
        assert check["status"] == OK and check["detail"], check
    database = payload["checks"][0]
    assert database["current"] == database["heads"] == [schema.history()[0].revision]
    assert result.stderr == ""


def test_the_human_output_is_a_table_and_a_verdict(healthy: Settings) -> None:
    result = run_cli(healthy)

    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0
    assert lines[0].split() == ["check", "status", "detail"]
    assert [line.split()[:2] for line in lines[2:-1]] == [[name, "OK"] for name in CHECK_NAMES]
    assert lines[-1] == "ready"


# --- failures: each one a check result, the others still reported -----------------------------


def test_an_unreachable_database_fails_its_checks_and_the_others_still_answer(
    fake_microservice: FakeMicroservice, tmp_path: Path
) -> None:
    settings = database_behind_closed_port(fake_microservice, tmp_path)

    only = [DATABASE, BROKER, MICROSERVICE, BEAT, MAINTENANCE]
    report = run_health_checks(settings, only=only)

    assert statuses(report) == {
        DATABASE: FAILED,
        BROKER: OK,
        MICROSERVICE: OK,
        BEAT: FAILED,
        MAINTENANCE: FAILED,
    }
    assert not report.ready
    database = report.check(DATABASE)
    assert database is not None and "cannot reach the database" in database.detail
    assert PASSWORD not in json.dumps(report.to_dict())


def test_the_command_on_an_unreachable_database_exits_1_without_traceback_or_password(
    fake_microservice: FakeMicroservice, tmp_path: Path
) -> None:
    settings = database_behind_closed_port(fake_microservice, tmp_path)

    as_json = run_cli(settings, "--json", "--only", DATABASE, "--only", BROKER)
    human = run_cli(settings, "--only", DATABASE, "--only", BROKER)

    assert as_json.returncode == human.returncode == 1
    payload = json.loads(as_json.stdout)
    assert [(c["name"], c["status"]) for c in payload["checks"]] == [
        (DATABASE, FAILED),
        (BROKER, OK),
    ]
    (database_row,) = [line for line in human.stdout.splitlines() if line.startswith(DATABASE)]
    assert "FAILED" in database_row and "stock_sync:***@127.0.0.1" in database_row
    assert human.stdout.strip().splitlines()[-1] == "NOT READY: database failed"
    for output in (as_json.stdout, as_json.stderr, human.stdout, human.stderr):
        assert "Traceback" not in output and PASSWORD not in output


def test_a_database_behind_the_head_fails_naming_both_revisions(
    make_throwaway_database: Any, fake_microservice: FakeMicroservice
) -> None:
    url: str = make_throwaway_database()
    head, previous = (revision.revision for revision in schema.history()[:2])
    schema.upgrade(url, previous)

    report = run_health_checks(settings_for(url, fake_microservice), only=[DATABASE])

    (database,) = report.checks
    assert database.status == FAILED
    assert f"at revision {previous}, not at the head {head}" in database.detail
    assert database.data == {"current": [previous], "heads": [head]}


def test_a_database_without_schema_fails(
    make_throwaway_database: Any, fake_microservice: FakeMicroservice
) -> None:
    url: str = make_throwaway_database()

    (database,) = run_health_checks(settings_for(url, fake_microservice), only=[DATABASE]).checks

    assert database.status == FAILED and "has no schema" in database.detail


def test_an_unreachable_broker_fails_and_its_password_is_masked(
    healthy: Settings, postgres_url: str, fake_microservice: FakeMicroservice
) -> None:
    broker = f"redis://:{PASSWORD}@127.0.0.1:{closed_port()}/0"
    settings = healthy.model_copy(update={"broker_url": broker})

    report = run_health_checks(settings)

    assert statuses(report) == {**dict.fromkeys(CHECK_NAMES, OK), BROKER: FAILED}
    check = report.check(BROKER)
    assert check is not None and "cannot reach the broker at redis://:***@127.0.0.1" in check.detail
    assert PASSWORD not in json.dumps(report.to_dict())


def test_an_unreachable_microservice_fails(healthy: Settings) -> None:
    settings = healthy.model_copy(update={"microservice_url": f"http://127.0.0.1:{closed_port()}"})

    report = run_health_checks(settings, only=[MICROSERVICE])

    (check,) = report.checks
    assert check.status == FAILED and "Connection refused" in check.detail


# For the tests with one stuck check: the real checks beside it get more than the production
# timeout, so that a slow moment of a loaded machine does not fail them (a 0.2 s limit could);
# not the default itself, so that a run ignoring the caller's timeout is seen.
ROOMY_TIMEOUT_S = health.DEFAULT_TIMEOUT_S + 2


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts TCP connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_microservice_that_never_answers_costs_its_timeout_and_the_others_are_reported(
    healthy: Settings, silent_server: str
) -> None:
    settings = healthy.model_copy(update={"microservice_url": silent_server})

    report = run_health_checks(settings, timeout_s=ROOMY_TIMEOUT_S)

    assert statuses(report) == {**dict.fromkeys(CHECK_NAMES, OK), MICROSERVICE: FAILED}
    check = report.check(MICROSERVICE)
    assert check is not None and "no answer in time" in check.detail


def test_a_check_that_hangs_is_reported_as_such_and_does_not_hold_the_others(
    healthy: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def hangs(*_: Any) -> health.CheckResult:
        release.wait(30)
        return health.CheckResult(BROKER, OK, "too late")

    monkeypatch.setitem(health.CHECKS, BROKER, hangs)
    try:
        report = run_health_checks(healthy, timeout_s=ROOMY_TIMEOUT_S)
    finally:
        release.set()

    assert statuses(report) == {**dict.fromkeys(CHECK_NAMES, OK), BROKER: FAILED}
    check = report.check(BROKER)
    assert check is not None and check.detail == f"no answer within {ROOMY_TIMEOUT_S:g} s"


def test_a_check_that_raises_becomes_one_failed_line(
    healthy: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def raises(*_: Any) -> health.CheckResult:
        raise RuntimeError(f"boom at redis://:{PASSWORD}@host\nsecond line")

    monkeypatch.setitem(health.CHECKS, BROKER, raises)
    (check,) = run_health_checks(healthy, only=[BROKER]).checks

    assert check.status == FAILED
    assert check.detail == "unexpected RuntimeError: boom at redis://:***@host"


# --- beat and the maintenance tasks -------------------------------------------------------------


def test_beat_is_judged_by_its_last_send(healthy: Settings) -> None:
    (beat,) = run_health_checks(healthy, only=[BEAT]).checks

    assert beat.status == OK and beat.detail.startswith("sent release-due-retries ")
    assert beat.data["allowed_s"] == 60  # three of its shortest interval (5 s), at least 60 s


def test_beat_is_stale_when_its_last_send_is_older_than_three_of_its_shortest_interval(
    healthy: Settings,
) -> None:
    later = utcnow() + timedelta(minutes=5)

    (beat,) = run_health_checks(healthy, now=later, only=[BEAT]).checks

    assert beat.status == FAILED
    assert "beat last sent release-due-retries 5 min ago" in beat.detail
    assert "(allowed 60 s): is beat running" in beat.detail


def test_beat_that_never_sent_fails(
    clean_database: Database, postgres_url: str, fake_microservice: FakeMicroservice
) -> None:
    record_maintenance_runs(clean_database)  # what workers did says nothing about beat
    settings = settings_for(postgres_url, fake_microservice)

    (beat,) = run_health_checks(settings, only=[BEAT]).checks

    assert beat.status == FAILED and beat.detail.startswith("beat never recorded a send")


def test_maintenance_is_stale_when_its_last_runs_are_older_than_three_intervals(
    healthy: Settings,
) -> None:
    later = utcnow() + timedelta(hours=2, minutes=5)

    (maintenance,) = run_health_checks(healthy, now=later, only=[MAINTENANCE]).checks

    assert maintenance.status == FAILED
    assert "the last sweep was 2 h 5 min ago (allowed 3 min)" in maintenance.detail
    assert "the last release of parked retries was 2 h 5 min ago (allowed 60 s)" in (
        maintenance.detail
    )
    assert "the last alert evaluation was 2 h 5 min ago" in maintenance.detail
    assert "a worker consuming the queue" in maintenance.detail
    assert maintenance.data[SWEEP]["age_s"] > maintenance.data[SWEEP]["allowed_s"] == 180


def test_maintenance_that_never_ran_fails_while_beat_sends(
    clean_database: Database, postgres_url: str, fake_microservice: FakeMicroservice
) -> None:
    beat_sent_now(clean_database)  # beat sends, and no worker consumes the maintenance queue
    settings = settings_for(postgres_url, fake_microservice)

    report = run_health_checks(settings, only=[BEAT, MAINTENANCE])

    assert statuses(report) == {BEAT: OK, MAINTENANCE: FAILED}
    maintenance = report.check(MAINTENANCE)
    assert maintenance is not None
    assert maintenance.detail.startswith(
        "the sweep never ran; the release of parked retries never ran;"
        " the alert evaluation never ran"
    )


def test_maintenance_allows_more_time_when_its_intervals_are_longer(healthy: Settings) -> None:
    settings = healthy.model_copy(
        update={
            "sweep_interval_s": 3600.0,
            "alert_interval_s": 3600.0,
            "retry_release_interval_s": 3600.0,
        }
    )
    later = utcnow() + timedelta(hours=2, minutes=5)

    (maintenance,) = run_health_checks(settings, now=later, only=[MAINTENANCE]).checks

    assert maintenance.status == OK, maintenance.detail


def test_a_failed_last_sweep_is_a_warning_naming_its_error(healthy: Settings) -> None:
    from stock_sync.adapters.db import get_database

    with pytest.raises(RuntimeError), recorded_run(get_database(healthy), SWEEP):
        raise RuntimeError("lock timeout")

    report = run_health_checks(healthy, only=[MAINTENANCE])

    (maintenance,) = report.checks
    assert maintenance.status == WARNING and report.ready
    assert "failed: RuntimeError: lock timeout" in maintenance.detail


# --- the worker's heartbeat -----------------------------------------------------------------


def test_a_fresh_heartbeat_is_a_live_worker(healthy: Settings) -> None:
    (worker,) = run_health_checks(healthy, only=[WORKER]).checks

    assert worker.status == OK
    assert worker.detail.startswith("worker celery@test-host (pid 4242) beat ")
    assert worker.data["allowed_s"] == 30  # three intervals of 10 s


def test_a_heartbeat_older_than_three_intervals_is_a_dead_or_hung_worker(
    healthy: Settings,
) -> None:
    later = utcnow() + timedelta(seconds=45)

    (worker,) = run_health_checks(healthy, now=later, only=[WORKER]).checks

    assert worker.status == FAILED
    assert "last beat 45 s ago (allowed 30 s): it is hung or was killed" in worker.detail


def test_no_heartbeat_fails_the_worker_check_asked_for_and_warns_in_the_full_report(
    healthy: Settings, tmp_path: Path
) -> None:
    settings = healthy.model_copy(update={"worker_heartbeat_file": str(tmp_path / "none")})

    (alone,) = run_health_checks(settings, only=[WORKER]).checks
    report = run_health_checks(settings)

    assert alone.status == FAILED and "no worker heartbeat at" in alone.detail
    assert statuses(report)[WORKER] == WARNING and report.ready
    result = run_cli(settings, "--only", WORKER)
    assert result.returncode == 1 and "NOT READY: worker failed" in result.stdout


def test_an_unreadable_heartbeat_fails(healthy: Settings) -> None:
    healthy.effective_worker_heartbeat_file.write_text("{not json")

    (worker,) = run_health_checks(healthy, only=[WORKER]).checks

    assert worker.status == FAILED and worker.detail.startswith("unreadable heartbeat file")


def test_a_real_worker_keeps_its_heartbeat_fresh_without_a_broker_and_removes_it_when_stopped(
    postgres_url: str, fake_microservice: FakeMicroservice, tmp_path: Path
) -> None:
    heartbeat_file = tmp_path / "worker.heartbeat"
    dead_broker = f"redis://127.0.0.1:{closed_port()}/0"  # it never gets to consume
    settings = settings_for(
        postgres_url,
        fake_microservice,
        broker_url=dead_broker,
        worker_heartbeat_file=str(heartbeat_file),
        worker_heartbeat_interval_s=0.2,
    )
    environment = {
        **environment_of(settings),
        "STOCK_SYNC_WORKER_HEARTBEAT_INTERVAL_S": "0.2",
        "STOCK_SYNC_QUEUE_NAME": run_queue_name("heartbeat"),
    }
    with celery_processes.stopped_at_exit() as started:
        worker = celery_processes.CeleryProcess(
            celery_processes.worker_arguments("threads", 1, loglevel=None),
            environment,
            tmp_path / "worker.log",
            ready_marker="Cannot connect to redis",  # started, and retrying the broker
        )
        started.append(worker)
        first = read_written(heartbeat_file)
        assert first.pid == worker.process.pid
        later = wait_for_a_newer_beat(heartbeat_file, first)  # rewritten, broker or not
        result = run_cli(settings, "--only", WORKER, "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["checks"][0]["pid"] == later.pid
        worker.stop()  # a warm shutdown
    assert not heartbeat_file.exists()


def read_written(path: Path) -> Heartbeat:
    from stock_sync.adapters.heartbeat import read_heartbeat

    deadline = utcnow() + timedelta(seconds=30)
    while (found := read_heartbeat(path)) is None:
        assert utcnow() < deadline, f"no heartbeat at {path}"
        time.sleep(0.05)
    return found


def wait_for_a_newer_beat(path: Path, seen: Heartbeat) -> Heartbeat:
    deadline = utcnow() + timedelta(seconds=30)
    while (found := read_written(path)).written_at <= seen.written_at:
        assert utcnow() < deadline, "the heartbeat was never rewritten"
        time.sleep(0.05)
    return found


def test_a_real_beat_records_its_sends_and_is_healthy_with_no_worker_to_run_them(
    clean_database: Database,
    postgres_url: str,
    fake_microservice: FakeMicroservice,
    tmp_path: Path,
) -> None:
    settings = settings_for(postgres_url, fake_microservice, data_dir=tmp_path)
    environment = {
        **environment_of(settings),
        "STOCK_SYNC_QUEUE_NAME": run_queue_name("beat"),
        "STOCK_SYNC_RETRY_RELEASE_INTERVAL_S": "0.5",
    }
    with celery_processes.stopped_at_exit() as started:
        started.append(celery_processes.beat(environment, tmp_path / "beat.log"))
        beat_check = wait_for_cli(settings, BEAT)
        maintenance = run_cli(settings, "--only", MAINTENANCE, "--json")

    assert beat_check["detail"].startswith("sent release-due-retries ")
    assert maintenance.returncode == 1  # nothing consumed the maintenance queue
    assert json.loads(maintenance.stdout)["checks"][0]["status"] == FAILED
    with clean_database.transaction() as session:
        assert BEAT_ROW in last_runs(session)


def wait_for_cli(settings: Settings, check: str) -> dict[str, Any]:
    """The check's JSON once `stock-sync health --only CHECK` passes (beat's first sends)."""
    deadline = utcnow() + timedelta(seconds=60)
    while True:
        result = run_cli(settings, "--only", check, "--json")
        if result.returncode == 0:
            found: dict[str, Any] = json.loads(result.stdout)["checks"][0]
            return found
        assert utcnow() < deadline, result.stdout + result.stderr
        time.sleep(0.5)


# --- the embedded default ---------------------------------------------------------------------


def embedded(tmp_path: Path) -> Settings:
    return Settings(database_url="", broker_url="", embedded=True, data_dir=tmp_path)


def test_the_embedded_default_is_a_loud_warning_that_does_not_make_it_unready(
    tmp_path: Path,
) -> None:
    report = run_health_checks(embedded(tmp_path), only=[EMBEDDED_DEFAULT])

    (check,) = report.checks
    assert check.status == WARNING and report.ready
    assert "SQLite database and filesystem broker" in check.detail


def test_the_command_on_the_embedded_default_warns_loudly_on_stderr_and_exits_0(
    tmp_path: Path,
) -> None:
    result = run_cli(embedded(tmp_path), "--only", EMBEDDED_DEFAULT, "--json")

    assert result.returncode == 0
    assert json.loads(result.stdout)["checks"][0]["status"] == WARNING
    assert result.stderr.startswith("WARNING: running on the embedded default")


def test_postgresql_with_a_filesystem_broker_is_still_warned_about(
    postgres_url: str, tmp_path: Path
) -> None:
    settings = Settings(database_url=postgres_url, broker_url="", embedded=True, data_dir=tmp_path)

    (check,) = run_health_checks(settings, only=[EMBEDDED_DEFAULT]).checks

    assert check.status == WARNING and "(filesystem broker)" in check.detail


def test_the_embedded_database_is_never_created_by_the_check(tmp_path: Path) -> None:
    (database,) = run_health_checks(embedded(tmp_path), only=[DATABASE]).checks

    assert database.status == FAILED and "no database file" in database.detail
    assert not (tmp_path / "stock_sync.sqlite3").exists()


# --- /readyz -----------------------------------------------------------------------------------


def call(app: Any, method: str = "GET") -> tuple[str, dict[str, str], bytes]:
    answer: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        answer.update(status=status, headers=dict(headers))

    body = b"".join(app({"REQUEST_METHOD": method, "PATH_INFO": "/readyz"}, start_response))
    return answer["status"], answer["headers"], body


def test_readyz_answers_200_with_the_report_when_ready(healthy: Settings) -> None:
    status, headers, body = call(readiness_app(healthy))

    assert status == "200 OK"
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["ready"] is True
    assert int(headers["Content-Length"]) == len(body)


def test_readyz_answers_503_when_a_check_failed(
    fake_microservice: FakeMicroservice, tmp_path: Path
) -> None:
    settings = database_behind_closed_port(fake_microservice, tmp_path)

    status, _, body = call(readiness_app(settings))

    assert status == "503 Service Unavailable"
    payload = json.loads(body)
    assert payload["ready"] is False and PASSWORD not in body.decode()


def test_readyz_answers_head_without_a_body_and_refuses_other_methods(
    healthy: Settings,
) -> None:
    app = readiness_app(healthy)

    assert call(app, "HEAD")[0] == "200 OK" and call(app, "HEAD")[2] == b""
    assert call(app, "POST")[0] == "405 Method Not Allowed"


def served_by_the_metrics_server(settings: Settings, *paths: str) -> list[tuple[int, Any]]:
    """GET ``paths`` from a real metrics server (threaded wsgiref) built for ``settings``."""
    import requests

    server = make_metrics_server(
        Database(settings.effective_database_url), settings, "127.0.0.1", 0, lambda: None
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        answers = [requests.get(base + path, timeout=15) for path in paths]
    finally:
        server.shutdown()
        server.server_close()
    return [(answer.status_code, answer.text) for answer in answers]


def test_the_metrics_server_is_ready_when_its_database_answers_whatever_the_others_do(
    clean_database: Database, postgres_url: str, fake_microservice: FakeMicroservice
) -> None:
    # beat never ran, no worker, the microservice and the broker down: other processes' faults
    settings = settings_for(
        postgres_url,
        fake_microservice,
        microservice_url=f"http://127.0.0.1:{closed_port()}",
        broker_url=f"redis://127.0.0.1:{closed_port()}/0",
    )

    ((status, body),) = served_by_the_metrics_server(settings, "/readyz")

    assert status == 200, body
    report = json.loads(body)
    assert report["ready"] is True
    assert [(check["name"], check["status"]) for check in report["checks"]] == [(DATABASE, OK)]


def test_the_metrics_server_is_live_but_not_ready_without_its_database(
    fake_microservice: FakeMicroservice, tmp_path: Path
) -> None:
    settings = database_behind_closed_port(fake_microservice, tmp_path)

    (live, ready) = served_by_the_metrics_server(settings, "/healthz", "/readyz")

    assert live[0] == 200  # liveness: the process serves
    assert ready[0] == 503
    report = json.loads(ready[1])
    assert {check["name"]: check["status"] for check in report["checks"]}["database"] == "failed"
    assert PASSWORD not in ready[1]


# --- the worker's warning at start ------------------------------------------------------------


def embedded_warnings(log: str) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [record for record in records if record.get("action") == "embedded_default"]


def test_a_worker_started_on_the_embedded_default_logs_one_warning(tmp_path: Path) -> None:
    environment = environment_of(embedded(tmp_path))
    with celery_processes.stopped_at_exit() as started:
        started.append(celery_processes.worker(environment, tmp_path / "worker.log"))
        log = started[0].log()

    (record,) = embedded_warnings(log)
    assert record["level"] == "WARNING" and record["logger"] == "stock_sync.health"
    assert record["message"].startswith("worker running on the embedded default")
    assert record["embedded"] == ["SQLite database", "filesystem broker"]


def test_a_worker_on_postgresql_and_redis_logs_no_such_warning(
    postgres_url: str, fake_microservice: FakeMicroservice, tmp_path: Path
) -> None:
    settings = settings_for(postgres_url, fake_microservice, data_dir=tmp_path)
    environment = {
        **environment_of(settings),
        "STOCK_SYNC_QUEUE_NAME": run_queue_name("health"),
    }
    with celery_processes.stopped_at_exit() as started:
        started.append(celery_processes.worker(environment, tmp_path / "worker.log"))
        log = started[0].log()

    assert "celery@" in log and embedded_warnings(log) == []

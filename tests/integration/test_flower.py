"""`make flower` / `stock-sync flower`: localhost by default, credentials from FLOWER_BASIC_AUTH
(never on a command line), refused without them unless declared local-only."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from stock_sync.adapters.db import Database
from stock_sync.adapters.stock_ledger import set_stock
from stock_sync.entrypoints import cli_monitoring
from stock_sync.entrypoints.cli import cli
from stock_sync_fake import FakeMicroservice
from tests import celery_processes
from tests.conftest import REDIS_URL
from tests.support import order

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("stock-sync"))
CREDENTIALS = "admin:S3CRET-FLOWER-PW"


# Not passed on to the processes: settings of this run, Flower's own, and make's.
FOREIGN_VARIABLES = ("STOCK_SYNC_", "FLOWER_", "MAKE", "MFLAGS")


def environment(**variables: str) -> dict[str, str]:
    kept = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_VARIABLES)}
    return {**kept, "STOCK_SYNC_BROKER_URL": REDIS_URL, **variables}


def flower(*args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "flower", *args],
        capture_output=True,
        text=True,
        env=environment(**variables),
        timeout=60,
    )


def flower_in_process(*args: str, **variables: str) -> Result:
    """The refusals happen before Flower is exec'd, so they can run in this process (with
    exec disarmed: a refusal that does not happen must not replace the test runner)."""
    unset: dict[str, str | None] = {
        name: None for name in os.environ if name.startswith(("FLOWER_", "STOCK_SYNC_"))
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli_monitoring.os, "execv", exec_disarmed)
        environment = {**unset, "STOCK_SYNC_BROKER_URL": REDIS_URL, **variables}
        return CliRunner().invoke(cli, ["flower", *args], env=environment)


def exec_disarmed(*argv: object) -> None:
    raise AssertionError(f"flower would have started: {argv}")


def refusal(result: subprocess.CompletedProcess[str] | Result) -> str:
    code = (
        result.returncode if isinstance(result, subprocess.CompletedProcess) else (result.exit_code)
    )
    assert code == 1, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert "S3CRET" not in result.stderr + result.stdout
    return result.stderr


def test_without_credentials_flower_is_refused() -> None:
    message = refusal(flower())
    assert "FLOWER_BASIC_AUTH is not set" in message and "--local-only" in message


@pytest.mark.parametrize("credentials", ["admin", "admin:", ":S3CRET", "admin:S3CRET,guest"])
def test_malformed_credentials_are_refused_without_quoting_them(credentials: str) -> None:
    message = refusal(flower_in_process(FLOWER_BASIC_AUTH=credentials))
    assert "FLOWER_BASIC_AUTH must be user:password" in message


def test_credentials_on_the_command_line_are_refused() -> None:
    result = flower_in_process("--basic-auth=admin:S3CRET", FLOWER_BASIC_AUTH=CREDENTIALS)
    assert "not on the command line" in refusal(result)


def test_local_only_is_refused_on_a_public_address() -> None:
    message = refusal(flower_in_process("--local-only", "--address", "0.0.0.0"))
    assert "only on a loopback address" in message


def make_flower_dry_run(*assignments: str) -> str:
    result = subprocess.run(
        ["make", "-s", "-n", "flower", *assignments],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_flower_runs_the_guarded_command_and_local_only_is_explicit() -> None:
    assert make_flower_dry_run().strip().endswith("stock-sync flower")
    assert make_flower_dry_run("FLOWER_LOCAL_ONLY=1").strip().endswith("flower --local-only")


def test_make_flower_refuses_without_credentials() -> None:
    result = subprocess.run(
        ["make", "-s", "flower"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment(),
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.startswith("error: FLOWER_BASIC_AUTH is not set")


# --- a real Flower ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def request_to(url: str, credentials: str | None) -> urllib.request.Request:
    request = urllib.request.Request(url)
    if credentials:
        token = base64.b64encode(credentials.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def status_of(url: str, credentials: str | None = None) -> int:
    try:
        with urllib.request.urlopen(request_to(url, credentials), timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def json_of(url: str, credentials: str) -> Any:
    with urllib.request.urlopen(request_to(url, credentials), timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def running_flower(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`stock-sync flower` with credentials in the environment, once it answers."""
    tmp_path = tmp_path_factory.mktemp("flower")
    port = free_port()
    with open(tmp_path / "out", "w") as stdout, open(tmp_path / "err", "w") as stderr:
        process = subprocess.Popen(
            [CLI, "flower", "--port", str(port)],
            env=environment(FLOWER_BASIC_AUTH=CREDENTIALS, STOCK_SYNC_DATA_DIR=str(tmp_path)),
            stdout=stdout,
            stderr=stderr,
            text=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status_of(f"http://127.0.0.1:{port}/healthcheck")
                break
            except OSError:
                assert process.poll() is None, "flower exited"
                assert time.monotonic() < deadline, "flower did not start"
                time.sleep(0.2)
        yield process, port
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_flower_asks_for_the_credentials_it_read_from_the_environment(
    running_flower: tuple[subprocess.Popen[str], int],
) -> None:
    _, port = running_flower
    assert status_of(f"http://127.0.0.1:{port}/") == 401
    assert status_of(f"http://127.0.0.1:{port}/", "admin:wrong") == 401
    assert status_of(f"http://127.0.0.1:{port}/", CREDENTIALS) == 200


def test_flower_listens_on_localhost_only_and_no_command_line_shows_the_password(
    running_flower: tuple[subprocess.Popen[str], int],
) -> None:
    process, port = running_flower
    command_line = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
    assert b"--address=127.0.0.1" in command_line
    assert not any(b"S3CRET" in argument for argument in command_line)
    assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, in /proc/net/tcp's hex


def test_flower_logs_json_lines_like_every_other_process(
    running_flower: tuple[subprocess.Popen[str], int],
) -> None:
    """Flower's, tornado's and Celery's records (the banner, the broker connection) reach
    stderr as our JSON objects, passwords masked; nothing goes to stdout."""
    process, port = running_flower
    # The fixture sent both streams to files: read them through the running process's fds.
    stdout, stderr = (Path(f"/proc/{process.pid}/fd/{fd}").read_text() for fd in (1, 2))
    records = [json.loads(line) for line in stderr.splitlines()]  # one JSON object per line
    assert records, "Flower logged nothing"
    for record in records:
        assert {"timestamp", "level", "logger", "pid", "message", "host"} <= set(record), record
        assert record["pid"] == process.pid
    banner = [record["message"] for record in records if record["logger"] == "flower.command"]
    assert f"Visit me at http://127.0.0.1:{port}" in banner
    assert any(message.startswith("Broker: redis://") for message in banner), banner
    assert stdout == ""


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as the kernel lists them) of sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


# --- Flower watching the pipeline -----------------------------------------------------------

STAGES = (
    "stock_sync.load_line_items",
    "stock_sync.validate_stock",
    "stock_sync.deduct_stock",
    "stock_sync.sync_microservice",
)


@pytest.fixture
def watched_worker(
    clean_database: Database,
    postgres_url: str,
    fake_microservice: FakeMicroservice,
    tmp_path: Path,
) -> Iterator[dict[str, str]]:
    """A worker process as production runs it (heartbeats and gossip on, task events off:
    STOCK_SYNC_TASK_EVENTS is not set), on a queue of its own; yields its environment once
    Flower has switched its task events on.

    Not the in-process test worker: it runs without heartbeats and gossip, so it has no event
    dispatcher and answers Flower's enable_events with "event dispatcher unavailable".
    """
    fake_microservice.reset()
    variables = celery_processes.process_environment(
        postgres_url, fake_microservice, tmp_path, "flower", dropping=FOREIGN_VARIABLES
    )
    hostname = f"flower-watched-{uuid.uuid4().hex[:8]}@%h"
    worker = celery_processes.worker(
        variables, tmp_path / "worker.log", "--hostname", hostname, "--without-mingle", quiet=False
    )
    try:
        deadline = time.monotonic() + 30  # Flower broadcasts enable_events every 5 s
        while "Events of group {task} enabled by remote" not in worker.log():
            assert time.monotonic() < deadline, "Flower never enabled the worker's task events"
            time.sleep(0.2)
        yield variables
    finally:
        worker.stop()


def submit(variables: dict[str, str], order_id: str) -> str:
    result = subprocess.run(
        [CLI, "submit", order_id], capture_output=True, text=True, env=variables, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def stage_states(port: int, operation_ids: list[str]) -> dict[str, dict[str, str]]:
    """Flower's /api/tasks, per operation: stage task name -> state."""
    tasks = json_of(f"http://127.0.0.1:{port}/api/tasks?limit=1000", CREDENTIALS)
    states: dict[str, dict[str, str]] = {operation_id: {} for operation_id in operation_ids}
    for task in tasks.values():
        for operation_id in operation_ids:
            if operation_id in str(task.get("args")):
                states[operation_id][task["name"]] = task["state"]
    return states


def test_flower_shows_the_four_stage_tasks_of_each_order_and_asks_for_credentials(
    running_flower: tuple[subprocess.Popen[str], int],
    watched_worker: dict[str, str],
    clean_database: Database,
    fake_microservice: FakeMicroservice,
) -> None:
    _, port = running_flower
    order_ids = [f"flower-{n}" for n in range(3)]
    for order_id in order_ids:
        fake_microservice.add_order(order(order_id, ("SKU-F", 1)))
    with clean_database.transaction() as session:
        set_stock(session, "SKU-F", 10)
    operation_ids = [submit(watched_worker, order_id) for order_id in order_ids]

    every_stage_succeeded = dict.fromkeys(STAGES, "SUCCESS")
    deadline = time.monotonic() + 60
    while (states := stage_states(port, operation_ids)) != dict.fromkeys(
        operation_ids, every_stage_succeeded
    ):
        assert time.monotonic() < deadline, states
        time.sleep(0.3)

    assert status_of(f"http://127.0.0.1:{port}/api/tasks") == 401
    assert status_of(f"http://127.0.0.1:{port}/api/tasks", "admin:wrong") == 401
    print(json.dumps(states, indent=2))  # shown with `pytest -s`

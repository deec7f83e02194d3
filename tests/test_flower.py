"""`make flower` / `stock-sync flower`: localhost by default, credentials from FLOWER_BASIC_AUTH
(never on a command line), refused without them unless declared local-only."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from stock_sync import cli_monitoring
from stock_sync.cli import cli
from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("stock-sync"))
CREDENTIALS = "admin:S3CRET-FLOWER-PW"


def environment(**variables: str) -> dict[str, str]:
    kept = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STOCK_SYNC_", "FLOWER_", "MAKE", "MFLAGS"))
    }
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
        return CliRunner().invoke(cli, ["flower", *args], env={**unset, **variables})


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


def status_of(url: str, credentials: str | None = None) -> int:
    request = urllib.request.Request(url)
    if credentials:
        token = base64.b64encode(credentials.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture(scope="module")
def running_flower(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`stock-sync flower` with credentials in the environment, once it answers."""
    tmp_path = tmp_path_factory.mktemp("flower")
    port = free_port()
    process = subprocess.Popen(
        [CLI, "flower", "--port", str(port)],
        env=environment(FLOWER_BASIC_AUTH=CREDENTIALS, STOCK_SYNC_DATA_DIR=str(tmp_path)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
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

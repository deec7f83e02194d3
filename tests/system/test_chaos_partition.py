"""``python -m stock_sync_dev.chaos_partition`` sized down (60 orders, partitions 1.5 s apart
held 6 s): stock-sync on separate hosts (network namespaces), w2 cut from PostgreSQL inside a
transaction, the microservice cut from every worker, w1 cut from the broker holding
unacknowledged messages, w3's link slowed; then every invariant of the fault suite must hold.
About 35 s. Skipped only where network namespaces cannot be made (not root, no netns support).

Also: the suite's cut really is silent (a connection across it times out, it is not refused),
and what a SIGKILLed run left behind is removed by the next start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from stock_sync_dev import netns

REPOSITORY = Path(__file__).resolve().parents[2]
ORDERS = 60
HANG_GUARD_S = 300  # only stops a hung run from hanging the suite
EXIT_HARNESS_FAILED = 2

_problem = netns.can_make_namespaces() if hasattr(os, "geteuid") else "not Linux"
# A developer's machine without root may skip it; `make test-all` (CI) requires it, so a CI
# machine that cannot make namespaces fails here instead of passing without the suite.
_required = os.environ.get("STOCK_SYNC_TEST_REQUIRE_NAMESPACES") == "1"
needs_namespaces = pytest.mark.skipif(
    _problem is not None and not _required,
    reason=f"network namespaces cannot be made here: {_problem}",
)


def run_suite(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stock_sync_dev.chaos_partition", *arguments],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )


@needs_namespaces
def test_every_invariant_holds_across_partitions() -> None:
    result = run_suite(
        "--orders", str(ORDERS), "--rate", "6", "--gap", "1.5", "--hold", "6",
        "--backoff-max", "1", "--json",
    )  # fmt: skip
    assert result.returncode != EXIT_HARNESS_FAILED, result.stderr[-6000:]
    report: dict[str, Any] = json.loads(result.stdout)

    # the partitions really happened, each as planned
    partitions = {p["name"]: p for p in report["partition_details"]}
    assert sorted(partitions) == ["microservice", "w1_broker", "w2_database", "w3_slow_link"]
    assert "unacknowledged message" in partitions["w1_broker"]["detail"]
    assert "transaction open" in partitions["w2_database"]["detail"]
    for name in ("microservice", "w1_broker", "w2_database"):
        assert partitions[name]["dropped_frames"] > 0, partitions[name]
    assert report["orphan_txn_s"] > 0  # w2's transaction stayed open on the server
    assert report["failed"] >= 1  # the greedy orders, at least
    assert report["calm_reached"], result.stderr[-6000:]

    violated = {a["name"]: a["examples"] for a in report["assertions"] if not a["ok"]}
    assert violated == {}, report["summary"] + "\n" + result.stderr[-8000:]
    assert result.returncode == 0
    assert not [name for name in netns.namespaces() if name.startswith(f"{netns.PREFIX}-")]


@needs_namespaces
def test_a_cut_drops_silently_and_heals() -> None:
    """A connection across a cut times out (no RST, no ICMP); after the heal it connects."""
    run_id = netns.new_run_id()
    netns.register_run(run_id)
    try:
        with netns.network(run_id) as net:
            a, b = net.add_host("a", 2), net.add_host("b", 3)
            server = subprocess.Popen(
                netns.in_namespace(
                    b.namespace, [sys.executable, "-m", "http.server", "7000", "--bind", b.address]
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                connect = [
                    sys.executable, "-c",
                    f"import socket; socket.create_connection(('{b.address}', 7000), timeout=2)",
                ]  # fmt: skip
                assert _eventually(lambda: _run_in(a, connect).returncode == 0)
                closed = _run_in(a, [*connect[:2], connect[2].replace("7000", "7001")])
                assert "ConnectionRefusedError" in closed.stderr  # what a cut must not look like
                net.cut("test", [a], [b], 7000)
                cut = _run_in(a, connect)
                assert "TimeoutError" in cut.stderr, cut.stderr  # not ConnectionRefusedError
                assert net.dropped("test") >= 1
                net.heal("test")
                assert _run_in(a, connect).returncode == 0
            finally:
                server.kill()
                server.wait()
    finally:
        netns.remove_run(run_id)


def _run_in(host: netns.Host, command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        netns.in_namespace(host.namespace, command), capture_output=True, text=True, timeout=30
    )


def _eventually(check: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


@needs_namespaces
def test_what_a_killed_run_left_is_removed_at_the_next_start() -> None:
    """A run registered by a process that is gone (SIGKILLed): its namespaces, the processes
    in them and its folder are removed by the sweep; a live run's are left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead_id, live_id = netns.new_run_id(), netns.new_run_id()
    netns.register_run(dead_id, dead.pid)
    netns.register_run(live_id)
    dead_net, live_net = netns.Network(dead_id), netns.Network(live_id)
    try:
        dead_net.create_switch()
        host = dead_net.add_host("a", 2)
        live_net.create_switch()
        orphan = subprocess.Popen(
            netns.in_namespace(host.namespace, ["sleep", "600"]), start_new_session=True
        )
        folder = Path(tempfile.mkdtemp(prefix=f"{netns.TEMP_PREFIX}{dead_id}-"))
        dead.send_signal(signal.SIGKILL)
        dead.wait()

        removed = netns.sweep_leftovers()

        assert f"namespace {host.namespace}" in removed
        assert orphan.wait(10) == -signal.SIGKILL
        assert not folder.exists()
        names = netns.namespaces()
        assert not [name for name in names if netns.run_id_of(name) == dead_id]
        assert live_net.switch in names  # the live run's are left alone
    finally:
        netns.remove_run(dead_id)
        netns.remove_run(live_id)


def test_a_machine_without_namespaces_gets_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``ip netns add`` fails, the suite says so in one line and exits 2."""
    from stock_sync_dev import chaos_partition

    monkeypatch.setattr(netns, "sweep_leftovers", lambda: [])
    monkeypatch.setattr(netns, "can_make_namespaces", lambda: "ip netns add: Permission denied")
    lines: list[str] = []
    monkeypatch.setattr(chaos_partition, "say", lines.append)
    assert chaos_partition.main(["--orders", "5"]) == EXIT_HARNESS_FAILED
    assert lines == [
        "chaos-partition: cannot create network namespaces here: ip netns add: Permission denied"
    ]

"""A small network of separate hosts made of Linux network namespaces, and the ways to break it:
the lab of ``python -m stock_sync_dev.chaos_partition`` (``make chaos-partition``).

The network: one namespace per host, all named ``sspt-<run id>-<host>``, and a switch
namespace holding a bridge. Each host has one ``eth0`` with an address in 198.18.0.0/24 (the
range RFC 2544 sets aside for benchmarking: nothing real lives there) and no other route, so a
host reaches the others only through the switch and nothing outside at all. A host is joined
to the switch by a veth pair, or by a *wire* (two tap devices and a process copying frames
between them) when its link must be able to delay and lose frames.

Why these tools: this kernel has no ``netem`` qdisc and no ``gact`` action
(``CONFIG_NET_SCH_NETEM`` and ``CONFIG_NET_ACT_GACT`` are not set), so ``tc`` can neither delay
nor drop. The two faults are made instead by:

- a *cut*: nftables rules in the switch's bridge (``table bridge``, hook ``forward``) that drop
  the frames between two hosts (optionally one TCP port) in both directions. Nothing tells
  either end: no RST, no ICMP, no ``EPERM`` from a local firewall, the link stays up. That is
  a partition as a broken switch or a firewall that lost its state makes one: the sockets stay
  open and only timeouts (TCP retransmission, keepalive, the application's own) can notice.
  (``ip link set down`` would tell the host at once, and a drop in the host's own OUTPUT chain
  fails ``send``/``connect`` with EPERM: neither is a partition.)
- a *slow link*: the wire of ``Wire`` copies every frame after ``delay`` and drops a share
  ``loss`` of them, in both directions, as ``tc netem delay D loss L`` on both ends would.

A run registers itself in ``REGISTRY`` (its id and process); ``sweep_leftovers`` removes the
namespaces, processes and temporary folders of any run whose process is gone, so a run that
was SIGKILLed is cleaned up by the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "sspt"  # stock-sync partition test
SUBNET = "198.18.0"
PREFIX_LENGTH = 24
SWITCH = "switch"
BRIDGE = "br0"
HOST_DEVICE = "eth0"
NFT_TABLE = "partition"
REGISTRY = Path("/run/stock-sync-partition")
TEMP_PREFIX = "stock-sync-partition-"
NETNS_DIR = Path("/run/netns")
COMMAND_TIMEOUT_S = 30.0
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
FRAME_BYTES = 65536


class NetworkError(Exception):
    """A namespace, a link or a rule could not be made (one line, the command and its error)."""


def run(command: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    """Run a command of the lab (``ip``, ``nft``...); its stdout, or NetworkError naming it."""
    try:
        result = subprocess.run(
            list(command),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NetworkError(f"{' '.join(command)}: {error}") from None
    if check and result.returncode != 0:
        detail = " ".join((result.stderr or result.stdout).split())[:300]
        raise NetworkError(f"{' '.join(command)}: exit {result.returncode}: {detail}")
    return result.stdout


def in_namespace(namespace: str, command: Sequence[str]) -> list[str]:
    """``command`` run inside ``namespace`` (``ip netns exec``)."""
    return ["ip", "netns", "exec", namespace, *command]


# --- entering a namespace from Python ---------------------------------------------------------


def enter_namespace(namespace: str) -> None:
    """Move the calling thread into ``namespace``; threads and processes it starts afterwards
    are born there. (``os.setns`` arrives with Python 3.12; this is the same call.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    descriptor = os.open(NETNS_DIR / namespace, os.O_RDONLY)
    try:
        if libc.setns(descriptor, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise NetworkError(f"setns into {namespace}: {os.strerror(error)}")
    finally:
        os.close(descriptor)


# --- runs: registering, and cleaning up after the dead ones -----------------------------------


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` (field 22 of /proc/PID/stat), None when it is gone: a pid
    alone could have been reused by another process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _registration_alive(path: Path) -> bool:
    try:
        pid_text, started = path.read_text().split()
        return _process_start(int(pid_text)) == started
    except (OSError, ValueError):
        return False


def register_run(run_id: str, pid: int | None = None) -> Path:
    """Note that the run ``run_id`` lives as long as the process ``pid`` (this one)."""
    pid = os.getpid() if pid is None else pid
    REGISTRY.mkdir(parents=True, exist_ok=True)
    path = REGISTRY / run_id
    path.write_text(f"{pid} {_process_start(pid)}\n")
    return path


def namespaces() -> list[str]:
    """Every named network namespace (``ip netns list``), names only."""
    return [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line.strip()]


def run_id_of(namespace: str) -> str | None:
    parts = namespace.split("-")
    return parts[1] if len(parts) >= 3 and parts[0] == PREFIX else None


def namespace_pids(namespace: str) -> list[int]:
    output = run(["ip", "netns", "pids", namespace], check=False)
    return [int(word) for word in output.split() if word.isdigit()]


def kill_namespace_processes(namespace: str) -> int:
    """SIGKILL every process living in ``namespace``; how many there were."""
    pids = [pid for pid in namespace_pids(namespace) if pid != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _process_start(pid) is not None and not _zombie(pid)]
        time.sleep(0.05)
    return len(pids)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def remove_namespaces(run_id: str) -> list[str]:
    """Kill every process living in a namespace of the run ``run_id``, then delete them (their
    veth pairs and taps go with them); what was removed."""
    mine = [name for name in namespaces() if run_id_of(name) == run_id]
    for name in mine:
        kill_namespace_processes(name)
    for name in mine:
        run(["ip", "netns", "delete", name], check=False)
    return [f"namespace {name}" for name in mine]


def remove_run(run_id: str) -> list[str]:
    """Remove every namespace, process and temporary folder of the run ``run_id``, and its
    registration; what was removed (for the report of a sweep)."""
    removed = remove_namespaces(run_id)
    for folder in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}{run_id}-*"):
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(f"folder {folder}")
    with contextlib.suppress(OSError):
        (REGISTRY / run_id).unlink()
    return removed


def sweep_leftovers() -> list[str]:
    """Remove what runs that died without cleaning up left behind (their registration names
    a process that is gone); runs still going are left alone."""
    ids = {run_id_of(name) for name in namespaces()} - {None}
    if REGISTRY.is_dir():
        ids |= {path.name for path in REGISTRY.iterdir()}
    for folder in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        ids.add(folder.name.removeprefix(TEMP_PREFIX).split("-")[0])
    removed = []
    for run_id in sorted(i for i in ids if i):
        if not _registration_alive(REGISTRY / run_id):
            removed += remove_run(run_id)
    return removed


def new_run_id() -> str:
    return uuid.uuid4().hex[:6]


# --- the network ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    namespace: str


@dataclass
class Network:
    """The namespaces of one run: a switch and its hosts. ``close`` removes them all."""

    run_id: str
    hosts: dict[str, Host] = field(default_factory=dict)
    wires: dict[str, Wire] = field(default_factory=dict)
    _cuts: set[str] = field(default_factory=set)

    def namespace(self, name: str) -> str:
        return f"{PREFIX}-{self.run_id}-{name}"

    @property
    def switch(self) -> str:
        return self.namespace(SWITCH)

    def create_switch(self) -> None:
        self._add_namespace(self.switch)
        run(["ip", "-n", self.switch, "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "-n", self.switch, "link", "set", BRIDGE, "up"])
        table = f"table bridge {NFT_TABLE} {{}}\n"
        run(in_namespace(self.switch, ["nft", "-f", "-"]), stdin=table)

    def _add_namespace(self, namespace: str) -> None:
        run(["ip", "netns", "add", namespace])
        run(["ip", "-n", namespace, "link", "set", "lo", "up"])

    def add_host(self, name: str, number: int, *, wire: bool = False) -> Host:
        """A host at ``SUBNET.number`` joined to the switch by a veth pair, or by a ``Wire``
        whose delay and loss can be changed while it carries traffic."""
        namespace = self.namespace(name)
        port = f"p-{name}"[:15]
        self._add_namespace(namespace)
        if wire:
            run(["ip", "-n", namespace, "tuntap", "add", "dev", HOST_DEVICE, "mode", "tap"])
            run(["ip", "-n", self.switch, "tuntap", "add", "dev", port, "mode", "tap"])
        else:
            run(
                [
                    "ip", "link", "add", HOST_DEVICE, "netns", namespace, "type", "veth",
                    "peer", "name", port, "netns", self.switch,
                ]
            )  # fmt: skip
        run(["ip", "-n", self.switch, "link", "set", port, "master", BRIDGE, "up"])
        address = f"{SUBNET}.{number}"
        run(
            ["ip", "-n", namespace, "addr", "add", f"{address}/{PREFIX_LENGTH}", "dev", HOST_DEVICE]
        )
        run(["ip", "-n", namespace, "link", "set", HOST_DEVICE, "up"])
        host = Host(name, address, namespace)
        self.hosts[name] = host
        if wire:
            self.wires[name] = Wire(namespace, HOST_DEVICE, self.switch, port)
        return host

    # --- cuts ---

    def cut(
        self, name: str, side_a: Sequence[Host], side_b: Sequence[Host], port: int | None
    ) -> None:
        """Drop, in the switch, every frame between a host of ``side_a`` and one of ``side_b``
        (only TCP to and from ``port`` of ``side_b`` when given), both ways, silently."""
        a = ", ".join(host.address for host in side_a)
        b = ", ".join(host.address for host in side_b)
        to_port = f" tcp dport {port}" if port is not None else ""
        from_port = f" tcp sport {port}" if port is not None else ""
        script = (
            f"add chain bridge {NFT_TABLE} {name} "
            "{ type filter hook forward priority 0; policy accept; }\n"
            f"add rule bridge {NFT_TABLE} {name} ip saddr {{ {a} }} ip daddr {{ {b} }}"
            f"{to_port} counter drop\n"
            f"add rule bridge {NFT_TABLE} {name} ip saddr {{ {b} }}{from_port} "
            f"ip daddr {{ {a} }} counter drop\n"
        )
        run(in_namespace(self.switch, ["nft", "-f", "-"]), stdin=script)
        self._cuts.add(name)

    def heal(self, name: str) -> None:
        script = f"flush chain bridge {NFT_TABLE} {name}\ndelete chain bridge {NFT_TABLE} {name}\n"
        run(in_namespace(self.switch, ["nft", "-f", "-"]), stdin=script)
        self._cuts.discard(name)

    def dropped(self, name: str) -> int:
        """Frames the cut ``name`` has dropped so far (the counters of its rules)."""
        listing = run(
            in_namespace(self.switch, ["nft", "-j", "list", "chain", "bridge", NFT_TABLE, name])
        )
        return sum(
            int(expression["counter"]["packets"])
            for item in json.loads(listing)["nftables"]
            for expression in item.get("rule", {}).get("expr", [])
            if "counter" in expression
        )

    @property
    def cuts(self) -> list[str]:
        return sorted(self._cuts)

    def rules(self) -> str:
        return run(in_namespace(self.switch, ["nft", "list", "table", "bridge", NFT_TABLE]))

    # --- the end ---

    def close(self) -> None:
        """Stop the wires, kill whatever still lives in the namespaces, delete them."""
        for wire in self.wires.values():
            wire.stop()
        remove_namespaces(self.run_id)


@contextlib.contextmanager
def network(run_id: str) -> Iterator[Network]:
    net = Network(run_id)
    try:
        net.create_switch()
        yield net
    finally:
        net.close()


def can_make_namespaces() -> str | None:
    """None when this machine lets us make namespaces, veth pairs, a bridge and nftables
    rules in it; otherwise why not, in one line."""
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return (
                f"'{tool}' is not installed (Debian: {'iproute2' if tool == 'ip' else 'nftables'})"
            )
    probe = Network(f"probe{uuid.uuid4().hex[:4]}")
    register_run(probe.run_id)  # a concurrent run's sweep leaves it alone
    try:
        probe.create_switch()
        probe.add_host("a", 2)
        probe.cut("probe", [probe.hosts["a"]], [probe.hosts["a"]], 1)
    except NetworkError as error:
        return str(error)
    finally:
        with contextlib.suppress(NetworkError):
            probe.close()
        remove_run(probe.run_id)
    return None


# --- the wire: a link with delay and loss -----------------------------------------------------


class Wire:
    """A process copying frames between a host's tap and the switch's tap (``relay``), told
    its delay and loss on its standard input; it ends when that closes."""

    def __init__(self, namespace_a: str, device_a: str, namespace_b: str, device_b: str) -> None:
        self._command = [
            sys.executable, "-m", "stock_sync_dev.netns", "wire",
            namespace_a, device_a, namespace_b, device_b,
        ]  # fmt: skip
        self._process: subprocess.Popen[str] | None = None
        self.delay_s = 0.0
        self.loss = 0.0

    def start(self, log_path: Path) -> None:
        with log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )

    def set(self, delay_s: float, loss: float) -> None:
        process = self._process
        if process is None or process.stdin is None or process.poll() is not None:
            raise NetworkError("the wire is not running")
        process.stdin.write(f"{delay_s} {loss}\n")
        process.stdin.flush()
        self.delay_s, self.loss = delay_s, loss

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def open_tap(namespace: str, device: str) -> int:
    """A descriptor attached to the (persistent) tap ``device`` of ``namespace``."""
    enter_namespace(namespace)
    descriptor = os.open("/dev/net/tun", os.O_RDWR)
    request = struct.pack("16sH", device.encode(), IFF_TAP | IFF_NO_PI)
    fcntl.ioctl(descriptor, TUNSETIFF, request)
    os.set_blocking(descriptor, False)
    return descriptor


def relay(namespace_a: str, device_a: str, namespace_b: str, device_b: str) -> None:
    """Copy frames both ways between two taps until stdin closes. Each frame is dropped with
    the current loss probability, else sent ``delay`` after it arrived; frames keep their
    order (a shorter delay never overtakes frames already waiting). Stdin lines: ``DELAY_S
    LOSS``."""
    tap_a, tap_b = open_tap(namespace_a, device_a), open_tap(namespace_b, device_b)
    other = {tap_a: tap_b, tap_b: tap_a}
    waiting: dict[int, deque[tuple[float, bytes]]] = {tap_a: deque(), tap_b: deque()}
    delay_s, loss = 0.0, 0.0
    rng = random.Random()
    control = sys.stdin.fileno()
    buffered = b""
    while True:
        now = time.monotonic()
        due = [queue[0][0] for queue in waiting.values() if queue]
        timeout = max(0.0, min(due) - now) if due else None
        readable, _, _ = select.select([tap_a, tap_b, control], [], [], timeout)
        now = time.monotonic()
        for descriptor in readable:
            if descriptor == control:
                chunk = os.read(control, 4096)
                if not chunk:
                    return
                buffered += chunk
                while b"\n" in buffered:
                    line, buffered = buffered.split(b"\n", 1)
                    delay_text, loss_text = line.split()
                    delay_s, loss = float(delay_text), float(loss_text)
                continue
            for _ in range(64):  # drain what is there, a bounded batch
                try:
                    frame = os.read(descriptor, FRAME_BYTES)
                except BlockingIOError:
                    break
                if loss and rng.random() < loss:
                    continue
                queue = waiting[other[descriptor]]
                send_at = max(now + delay_s, queue[-1][0] if queue else 0.0)
                queue.append((send_at, frame))
        for descriptor, queue in waiting.items():
            while queue and queue[0][0] <= now:
                _, frame = queue.popleft()
                with contextlib.suppress(OSError):  # the other end is down: lost
                    os.write(descriptor, frame)


def main(argv: Sequence[str]) -> int:
    if len(argv) == 5 and argv[0] == "wire":
        relay(*argv[1:])
        return 0
    print("usage: python -m stock_sync_dev.netns wire NS_A DEV_A NS_B DEV_B", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""RabbitMQ for the tests and the fault suite: virtual hosts of their own, made and removed with
``rabbitmqctl``, and what the broker holds in them.

``rabbitmqctl`` talks to a node over Erlang distribution, so it needs the node's cookie: run as
root or as the ``rabbitmq`` user (Debian's wrapper switches to that user by itself).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stock_sync_dev.processes import ChildProcess

RABBITMQCTL_TIMEOUT_S = 60.0
DEFAULT_NODE = "rabbit@localhost"
# A test run's virtual host carries the pid of the process that made it, so that a later run
# can tell the ones left by a killed run (that pid is gone) from those of a run still going.
_OWNED_VHOST = re.compile(r"^(?P<prefix>.+)-pid(?P<pid>\d+)-[0-9a-f]+$")


class RabbitMQError(Exception):
    """rabbitmqctl is missing, failed, or the node did not answer."""


def rabbitmqctl(
    *arguments: str, node: str | None = None, timeout_s: float = RABBITMQCTL_TIMEOUT_S
) -> str:
    """Run ``rabbitmqctl [-n node] ARGUMENTS``; its standard output, RabbitMQError if it fails."""
    executable = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    if not os.path.exists(executable):
        raise RabbitMQError(
            "rabbitmqctl not found: install RabbitMQ (apt-get install rabbitmq-server)"
        )
    command = [executable, *(("-n", node) if node else ()), *arguments]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise RabbitMQError(
            f"rabbitmqctl {' '.join(arguments)}: no answer in {timeout_s:g} s"
        ) from None
    if result.returncode != 0:
        detail = " ".join((result.stderr or result.stdout).split())[:500]
        raise RabbitMQError(f"rabbitmqctl {' '.join(arguments)} failed: {detail}")
    return result.stdout


def owned_vhost_name(prefix: str, tag: str) -> str:
    """``<prefix>-pid<this process's pid>-<tag>``: see :func:`remove_abandoned_vhosts`."""
    return f"{prefix}-pid{os.getpid()}-{tag}"


def add_vhost(name: str, *, user: str = "guest", node: str | None = None) -> None:
    """A new virtual host with every permission for ``user``."""
    rabbitmqctl("add_vhost", name, node=node)
    rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*", node=node)


def delete_vhost(name: str, *, node: str | None = None) -> None:
    """Remove the virtual host with everything in it (queues, exchanges, messages)."""
    rabbitmqctl("delete_vhost", name, node=node)


def vhosts(*, node: str | None = None) -> list[str]:
    listed = json.loads(rabbitmqctl("list_vhosts", "--formatter", "json", node=node))
    return [str(entry["name"]) for entry in listed]


def remove_abandoned_vhosts(prefix: str, *, node: str | None = None) -> list[str]:
    """Delete the ``owned_vhost_name(prefix, ...)`` hosts whose process is gone (a run killed
    before its clean-up); returns their names."""
    removed = []
    for name in vhosts(node=node):
        match = _OWNED_VHOST.match(name)
        if match is None or match["prefix"] != prefix or _alive(int(match["pid"])):
            continue
        delete_vhost(name, node=node)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class QueueInfo:
    """A queue as the broker reports it."""

    name: str
    type: str
    durable: bool
    arguments: dict[str, Any]
    messages: int


def queues(vhost: str, *, node: str | None = None) -> dict[str, QueueInfo]:
    """Every queue of ``vhost`` by name."""
    columns: Sequence[str] = ("name", "type", "durable", "arguments", "messages")
    output = rabbitmqctl("list_queues", "-p", vhost, *columns, "--formatter", "json", node=node)
    found = {}
    for entry in json.loads(output):
        arguments = entry.get("arguments") or {}
        if isinstance(arguments, list):  # [name, AMQP type, value] triples
            arguments = {item[0]: item[-1] for item in arguments}
        found[entry["name"]] = QueueInfo(
            name=entry["name"],
            type=str(entry.get("type", "")),
            durable=bool(entry.get("durable")),
            arguments=dict(arguments),
            messages=int(entry.get("messages") or 0),
        )
    return found


# --- a node of its own -------------------------------------------------------------------------

SERVER_SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"
NODE_START_TIMEOUT_S = 180.0
NODE_STOP_TIMEOUT_S = 60.0
RABBITMQ_USER = "rabbitmq"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateNode:
    """A RabbitMQ node of its own, from the machine's RabbitMQ installation: its own name, AMQP
    and distribution ports on 127.0.0.1 and data folder (removed by :meth:`stop`), so that
    stopping it disturbs no other user of the machine's node.

    It runs as the ``rabbitmq`` user (as Debian's node does: that user's Erlang cookie is the
    one rabbitmqctl uses), so this process must be root or that user.
    """

    def __init__(self, tag: str) -> None:
        self.name = f"stock-sync-{tag}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self._folder: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, vhost: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost}"

    @property
    def log_path(self) -> Path | None:
        return None if self._folder is None else self._folder / "node.log"

    def start(self) -> None:
        """Boot the node and wait until it accepts AMQP connections."""
        prefix = _as_rabbitmq_user()
        if not os.path.exists(SERVER_SCRIPT):
            raise RabbitMQError(f"{SERVER_SCRIPT} not found: install RabbitMQ (rabbitmq-server)")
        folder = self._folder = Path(tempfile.mkdtemp(prefix="stock-sync-rabbitmq-"))
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (folder / "enabled_plugins").write_text("[].\n")
        if os.geteuid() == 0:
            for path in (folder, *folder.iterdir()):
                shutil.chown(path, RABBITMQ_USER)
        variables = {
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_PID_FILE": str(folder / "node.pid"),
            "HOME": os.path.expanduser(f"~{RABBITMQ_USER}"),  # where its Erlang cookie is
        }
        command = [*prefix, "env", *(f"{k}={v}" for k, v in variables.items()), SERVER_SCRIPT]
        # its own session: a terminal's Ctrl-C is ours to handle, not the node's
        node = ChildProcess(
            command, dict(os.environ), folder / "node.log", cwd=Path(variables["HOME"])
        )
        self._process = node.process
        self._wait_until_booted()

    def _wait_until_booted(self) -> None:
        from kombu.connection import Connection

        connect: Any = Connection  # kombu is untyped
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise RabbitMQError(f"the RabbitMQ node {self.name} exited; see {self.log_path}")
            try:
                with connect(self.url(""), connect_timeout=1) as connection:
                    connection.ensure_connection(max_retries=1)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RabbitMQError(f"the RabbitMQ node {self.name} did not boot") from None
                time.sleep(0.2)
        # The listener opens before the last boot steps: a stop_app before those end fails.
        rabbitmqctl("await_startup", "--timeout", "60", node=self.name)

    def stop_app(self) -> None:
        """Stop RabbitMQ on the node, the Erlang VM staying up: every connection is closed,
        what quorum queues hold stays on disk."""
        rabbitmqctl("stop_app", node=self.name)

    def start_app(self) -> None:
        rabbitmqctl("start_app", node=self.name)
        rabbitmqctl("await_startup", "--timeout", "60", node=self.name)

    def stop(self) -> None:
        """Halt the node and remove its folder."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            try:
                rabbitmqctl("stop", node=self.name, timeout_s=NODE_STOP_TIMEOUT_S)
                process.wait(NODE_STOP_TIMEOUT_S)
            except (RabbitMQError, subprocess.TimeoutExpired):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def _as_rabbitmq_user() -> list[str]:
    """The command prefix that runs a program as the rabbitmq user."""
    if os.geteuid() == 0:
        return ["runuser", "-u", RABBITMQ_USER, "--"]
    if pwd.getpwuid(os.geteuid()).pw_name == RABBITMQ_USER:
        return []
    raise RabbitMQError(f"a RabbitMQ node of its own runs as root or as the {RABBITMQ_USER} user")

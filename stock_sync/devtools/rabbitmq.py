"""RabbitMQ for the tests and the fault suite: virtual hosts of their own, made and removed with
``rabbitmqctl``, and what the broker holds in them.

``rabbitmqctl`` talks to a node over Erlang distribution, so it needs the node's cookie: run as
root or as the ``rabbitmq`` user (Debian's wrapper switches to that user by itself).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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

"""Property: whatever arguments an operator types, the CLI answers with an exit code from its
documented set, never a traceback; a refusal is exactly one ``error:`` line on stderr and
writes nothing.

In this process (click's CliRunner) on a throwaway embedded SQLite database created once for
the module, with a dispatcher stub instead of a broker (every fourth enqueue fails, as a broker
that is down would, with a password in its error), so no worker or server is needed.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import tasks  # noqa: F401  (imported before the workbench patches get_services: see there)
from stock_sync import composition, producer
from stock_sync.adapters import schema
from stock_sync.adapters.settings import get_settings
from stock_sync.adapters.stock_ledger import MAX_STOCK_QUANTITY
from stock_sync.composition import Services, build_services
from stock_sync.domain.statuses import OperationStatus
from stock_sync.entrypoints.cli import cli

PROPERTY = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
BROKER_PASSWORD = "BR0KERPW"
USAGE_ERROR = 2

# What an argv can hold: any character but NUL, including the lone surrogates Python decodes
# undecodable bytes to, control characters and line separators.
argv_characters = st.one_of(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
    st.sampled_from("\n\r\t\x1b\x85\u2028\u2029 -"),
)
printable_characters = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"))
any_text = st.one_of(
    st.text(printable_characters, max_size=40), st.text(argv_characters, max_size=40)
)
long_text = st.text(printable_characters, min_size=100, max_size=400)
skus = st.one_of(any_text, st.sampled_from(["SKU-1", "SKU-2", " SKU-1 ", "x" * 129]))
quantities = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.integers(min_value=0, max_value=MAX_STOCK_QUANTITY).map(str),
    st.sampled_from(["2147483647", "2147483648", "9223372036854775808", "1e3", "-0", "+5"]),
    st.sampled_from(["9" * 5000, "0" * 50 + "7", " 12 ", "1_000", "٣", "inf", "nan"]),
    any_text,
)
flags = st.lists(st.sampled_from(["--json", "--help", "--bogus", "--", "-x"]), max_size=2)


class FlakyDispatcher:
    """Accepts three enqueues in four; the fourth fails like a broker that is down."""

    def __init__(self) -> None:
        self.enqueued: list[uuid.UUID] = []

    def enqueue_pipeline(
        self, operation_id: uuid.UUID, status: OperationStatus, generation: int
    ) -> None:
        if operation_id.int % 4 == 0:
            raise ConnectionError(f"cannot reach redis://:{BROKER_PASSWORD}@broker:6379/0")
        self.enqueued.append(operation_id)

    def enqueue_rollback(self, adjustment_operation_id: uuid.UUID, generation: int) -> None:
        self.enqueued.append(adjustment_operation_id)

    def enqueue_probe(self, probe_id: int) -> None:
        pass


class Workbench:
    """The module's database, CLI runner and the operations created so far."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "stock_sync.sqlite3"
        self.runner = CliRunner()
        self.operation_ids: list[str] = []

    def invoke(self, args: list[str]) -> Result:
        return self.runner.invoke(cli, args)

    def fingerprint(self) -> tuple[Any, ...]:
        """Everything a command could write, read straight from the file."""
        with sqlite3.connect(self.path) as connection:
            return (
                connection.execute(
                    "select sku, quantity from stock_levels order by sku"
                ).fetchall(),
                connection.execute("select count(*) from stock_movements").fetchone(),
                connection.execute(
                    "select id, status, cancelled_by from pending_stock_operations order by id"
                ).fetchall(),
                connection.execute("select count(*) from operation_events").fetchone(),
            )

    def level(self, sku: str) -> int | None:
        with sqlite3.connect(self.path) as connection:
            row = connection.execute(
                "select quantity from stock_levels where sku = ?", (sku,)
            ).fetchone()
        return None if row is None else row[0]


@pytest.fixture(scope="module")
def workbench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workbench]:
    data_dir = tmp_path_factory.mktemp("cli-properties")
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("STOCK_SYNC_")]:
            patch.delenv(name)
        patch.setenv("STOCK_SYNC_DATA_DIR", str(data_dir))
        patch.setenv("STOCK_SYNC_EMBEDDED", "1")
        get_settings.cache_clear()
        schema.upgrade(get_settings().effective_database_url)
        services: Services = build_services(get_settings(), dispatcher=FlakyDispatcher())
        # (the task modules, imported above, keep the real get_services: a task module first
        # imported under this patch would serve the module's SQLite services for good)
        patch.setattr(composition, "get_services", lambda: services)
        patch.setattr(producer, "get_services", lambda: services)
        bench = Workbench(data_dir)
        for sku, quantity in (("SKU-1", "5"), ("SKU-2", "0")):
            assert bench.invoke(["stock", "set", sku, quantity]).exit_code == 0
        for order in ("order-1", "order-2", "order-3", "order-4", "order-5"):
            bench.operation_ids.append(bench.invoke(["submit", order]).stdout.strip())
        yield bench
        services.database.dispose()
    # nothing built on the module's embedded settings may serve the tests after it
    get_settings.cache_clear()
    composition.reset_services()


def assert_clean(result: Result, allowed: set[int]) -> None:
    """The exit code is a documented one, no traceback, an error is one ``error:`` line."""
    output = result.stdout + result.stderr
    event(f"exit {result.exit_code}")
    assert result.exit_code in allowed, (result.exit_code, output, result.exception)
    assert "Traceback" not in output and BROKER_PASSWORD not in output
    if result.exit_code in (1, USAGE_ERROR):
        assert result.stderr.startswith("error: "), result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert not result.stderr.startswith("error: unexpected"), result.stderr


def refused_or_done(workbench: Workbench, args: list[str], allowed: set[int]) -> Result:
    """Run ``args``; when refused, nothing may have changed."""
    before = workbench.fingerprint()
    result = workbench.invoke(args)
    assert_clean(result, allowed)
    if result.exit_code in (1, USAGE_ERROR):
        assert workbench.fingerprint() == before, args
    return result


@PROPERTY
@given(sku=skus, quantity=quantities, extra=flags)
def test_stock_set(workbench: Workbench, sku: str, quantity: str, extra: list[str]) -> None:
    result = refused_or_done(workbench, ["stock", "set", sku, quantity, *extra], {0, 1, 2})
    if result.exit_code == 0 and not extra:
        stored = workbench.level(sku.strip())
        assert stored is not None and 0 <= stored <= MAX_STOCK_QUANTITY
        assert result.stdout.endswith(f"-> {stored}\n")


@PROPERTY
@given(sku=skus, extra=flags)
def test_stock_get(workbench: Workbench, sku: str, extra: list[str]) -> None:
    before = workbench.fingerprint()
    assert_clean(workbench.invoke(["stock", "get", sku, *extra]), {0, 1, 2})
    assert workbench.fingerprint() == before


def operation_ids(workbench: Workbench) -> st.SearchStrategy[str]:
    return st.one_of(
        any_text,
        st.uuids().map(str),
        st.sampled_from(workbench.operation_ids),
        st.sampled_from(workbench.operation_ids).map(lambda i: f" {i.upper()} "),
    )


@PROPERTY
@given(data=st.data(), extra=flags)
def test_show(workbench: Workbench, data: st.DataObject, extra: list[str]) -> None:
    operation_id = data.draw(operation_ids(workbench))
    before = workbench.fingerprint()
    assert_clean(workbench.invoke(["show", operation_id, *extra]), {0, 1, 2})
    assert workbench.fingerprint() == before


@PROPERTY
@given(data=st.data(), by=st.one_of(any_text, long_text), reason=st.one_of(any_text, long_text))
def test_cancel(workbench: Workbench, data: st.DataObject, by: str, reason: str) -> None:
    operation_id = data.draw(operation_ids(workbench))
    refused_or_done(workbench, ["cancel", operation_id, "--by", by, "--reason", reason], {0, 1, 2})


statuses = st.one_of(any_text, st.sampled_from([s.value for s in OperationStatus]))


@PROPERTY
@given(status=statuses, order=st.one_of(st.none(), any_text), extra=flags)
def test_list(workbench: Workbench, status: str, order: str | None, extra: list[str]) -> None:
    args = ["list", "--status", status, *(["--order", order] if order is not None else []), *extra]
    before = workbench.fingerprint()
    assert_clean(workbench.invoke(args), {0, 2})
    assert workbench.fingerprint() == before


@PROPERTY
@given(order=st.one_of(any_text, long_text), account=st.one_of(st.none(), any_text))
def test_submit(workbench: Workbench, order: str, account: str | None) -> None:
    args = ["submit", order, *(["--account", account] if account is not None else [])]
    result = refused_or_done(workbench, args, {0, 1, 2, 3})
    if result.exit_code in (0, 3):
        operation_id = result.stdout.strip()
        assert str(uuid.UUID(operation_id)) == operation_id and result.stdout.count("\n") == 1
    if result.exit_code == 3:
        assert result.stderr.startswith("warning: ") and len(result.stderr.splitlines()) == 1

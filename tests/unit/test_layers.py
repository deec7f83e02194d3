"""The layout is the architecture: import-linter's contracts hold (the domain is plain Python,
the layers import only downwards), an upward import is caught, and no import cycle is left."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

REPOSITORY = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))
CONTRACTS = 3  # domain purity, domain independence, the layers


def lint_imports(folder: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(folder)}
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache"],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_import_contract_is_kept() -> None:
    result = lint_imports(REPOSITORY)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {CONTRACTS} kept, 0 broken" in result.stdout


def test_an_import_from_a_layer_above_breaks_the_layers_contract(tmp_path: Path) -> None:
    for name in ("stock_sync", "stock_sync_fake", "stock_sync_dev", "tasks"):
        shutil.copytree(REPOSITORY / name, tmp_path / name)
    shutil.copy(REPOSITORY / "pyproject.toml", tmp_path)
    service = tmp_path / "stock_sync" / "services" / "queries.py"
    service.write_text(service.read_text() + "\nfrom stock_sync.entrypoints import render\n")

    result = lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Layers: dev tools > fake > entrypoints" in result.stdout
    assert "BROKEN" in result.stdout
    assert "stock_sync.services.queries -> stock_sync.entrypoints.render" in result.stdout


def import_cycles(*packages: str) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), function-level
    imports included."""
    graph = grimp.build_graph(*packages, include_external_packages=False)
    edges = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in edges[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = [stack.pop()]
            while component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycle_is_left() -> None:
    assert import_cycles("stock_sync", "stock_sync_fake", "stock_sync_dev", "tasks") == []


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path) -> None:
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from cyclic import b  # noqa\n")
    (package / "b.py").write_text("from cyclic import a  # noqa\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert import_cycles("cyclic") == [["cyclic.a", "cyclic.b"]]
    finally:
        sys.path.remove(str(tmp_path))


def test_the_runtime_command_line_loads_the_fake_only_for_its_command() -> None:
    probe = (
        "import sys, click\n"
        "from stock_sync.entrypoints.cli import cli\n"
        "loaded = lambda: sorted(m for m in sys.modules if m.startswith('stock_sync_'))\n"
        "before = loaded()\n"
        "listed = 'fake-microservice' in cli.list_commands(click.Context(cli))\n"
        "command = cli.get_command(click.Context(cli), 'fake-microservice')\n"
        "print(before, listed, command.name, 'stock_sync_fake.command' in loaded())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )

    assert result.stdout.split() == ["[]", "True", "fake-microservice", "True"]

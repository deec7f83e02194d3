"""The runtime stays readable in one sitting: no module of the runtime packages over 600 lines,
no function or method over 50 (decorators and docstrings included). The development tools
(stock_sync_dev) and the tests are not held to it."""

from __future__ import annotations

import ast
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
RUNTIME = ("stock_sync", "stock_sync_fake", "tasks")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 50


def runtime_modules() -> list[Path]:
    modules = [path for top in RUNTIME for path in (REPOSITORY / top).rglob("*.py")]
    return [*sorted(modules), REPOSITORY / "celeryconfig.py"]


def function_lengths(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            found.append(
                (f"{path.relative_to(REPOSITORY)}:{node.name}", node.end_lineno - first + 1)
            )
    return found


def test_no_runtime_module_is_over_600_lines() -> None:
    lengths = {
        str(p.relative_to(REPOSITORY)): len(p.read_text().splitlines()) for p in runtime_modules()
    }
    assert {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES} == {}


def test_no_runtime_function_is_over_50_lines() -> None:
    lengths = [item for path in runtime_modules() for item in function_lengths(path)]
    assert sorted(item for item in lengths if item[1] > MAX_FUNCTION_LINES) == []

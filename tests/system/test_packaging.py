"""The built wheel works outside the repository: installed into a fresh virtual environment the
way docker/Dockerfile installs it (requirements.lock with --require-hashes, then the wheel with
--no-deps), `stock-sync db upgrade` migrates a database from another folder, and `tasks` and
`celeryconfig` import from site-packages.

Why the dependencies come from requirements.lock and the package index rather than from this
virtual environment: that is the image's recipe, so the test also proves the lock is complete
(`pip check`), and nothing of the checkout can leak in. With pip's cache warm it costs about
20 s on a 2-core machine; the wheel itself is built from a copy of the sources, so no build/
folder is left in the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect

from stock_sync.adapters import schema

REPO = Path(__file__).resolve().parents[2]
# What docker/Dockerfile's wheel stage copies (tests/unit/test_docker_files.py checks that it does).
WHEEL_SOURCES = (
    "pyproject.toml",
    "README.md",
    "celeryconfig.py",
    "stock_sync",
    "stock_sync_fake",
    "tasks",
    "migrations",
)
# The top-level packages the wheel installs; stock_sync_dev (demo, benchmark, fault suites)
# stays out of it.
WHEEL_PACKAGES = ("stock_sync", "stock_sync_fake", "tasks")
# The package the wheel installs migrations/ as (pyproject.toml, [tool.setuptools.package-dir]).
MIGRATIONS_PACKAGE = schema.MIGRATIONS_PACKAGE
TABLES = {
    "pending_stock_operations",
    "stock_levels",
    "stock_movements",
    "operation_events",
    "maintenance_runs",
}
PIP_TIMEOUT_S = 600


def setuptools_config() -> dict[str, Any]:
    config: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]
    return dict(config["setuptools"])


def source_packages() -> set[str]:
    """Every package of the source tree, named as it is installed."""
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for top in WHEEL_PACKAGES
        for init in (REPO / top).rglob("__init__.py")
    }
    return found | {MIGRATIONS_PACKAGE, f"{MIGRATIONS_PACKAGE}.versions"}


def test_every_package_of_the_source_tree_is_listed_for_the_wheel() -> None:
    config = setuptools_config()
    assert set(config["packages"]) == source_packages()
    assert config["package-dir"] == {MIGRATIONS_PACKAGE: "migrations"}
    assert config["py-modules"] == ["celeryconfig"]
    assert "script.py.mako" in config["package-data"][MIGRATIONS_PACKAGE]


def test_the_source_tree_finds_its_migrations() -> None:
    assert (schema.migrations_dir() / "env.py").is_file()
    assert schema.migrations_dir().resolve() == (REPO / "migrations").resolve()


# --- the wheel, installed outside the repository -------------------------------------------------


def pip(*args: str, python: Path | None = None) -> str:
    """This environment's pip, acting on ``python``'s environment when given (pip --python)."""
    target = ["--python", str(python)] if python else []
    # No PYTHONPATH: the checkout on it would count as installed in the target environment.
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", *target, *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    return result.stdout


def build_wheel(workdir: Path) -> Path:
    """The wheel of a copy of the sources (setuptools writes build/ beside what it builds)."""
    source = workdir / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in WHEEL_SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, source / name)
    pip("wheel", "--no-deps", "--quiet", "--wheel-dir", str(workdir / "dist"), str(source))
    (wheel,) = (workdir / "dist").glob("stock_sync-*.whl")
    return wheel


def expected_wheel_files() -> set[str]:
    """Every source file, at the path the wheel installs it to."""
    files = {"celeryconfig.py", f"{MIGRATIONS_PACKAGE}/script.py.mako"}
    for top in WHEEL_PACKAGES:
        files |= {str(p.relative_to(REPO)) for p in (REPO / top).rglob("*.py")}
    files |= {
        f"{MIGRATIONS_PACKAGE}/{p.relative_to(REPO / 'migrations')}"
        for p in (REPO / "migrations").rglob("*.py")
    }
    return files


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtual environment holding the locked dependencies and the wheel; yields its
    python."""
    workdir = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(workdir)
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = expected_wheel_files() - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert not [name for name in names if name.startswith("stock_sync_dev/")], "dev tools shipped"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(workdir / "venv")], check=True
    )
    python = workdir / "venv" / "bin" / "python"
    lock = str(REPO / "requirements.lock")
    pip("install", "--quiet", "--require-hashes", "-r", lock, python=python)
    pip("install", "--quiet", "--no-deps", str(wheel), python=python)
    pip("check", python=python)  # the lock satisfies every requirement of the wheel
    yield python


def outside_the_repository(tmp_path: Path, database_url: str) -> dict[str, Any]:
    """cwd and environment of a process run from elsewhere: no PYTHONPATH, no checkout."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTHON")}
    env.pop("VIRTUAL_ENV", None)
    env.update(
        STOCK_SYNC_DATABASE_URL=database_url,
        STOCK_SYNC_DATA_DIR=str(tmp_path / "data"),
        PYTHONNOUSERSITE="1",
    )
    return {"cwd": elsewhere, "env": env, "capture_output": True, "text": True, "timeout": 120}


def show(result: subprocess.CompletedProcess[str]) -> str:
    """The command and its output, printed (pytest -s shows them) and used in assertions."""
    text = f"$ {' '.join(map(str, result.args))}\n{result.stdout}{result.stderr}"
    print(text)
    return text


PROBE = """
import json, celeryconfig, stock_sync, tasks
from stock_sync.adapters import schema
print(json.dumps({
    "stock_sync": stock_sync.__file__,
    "tasks": tasks.__file__,
    "celeryconfig": celeryconfig.__file__,
    "migrations": str(schema.migrations_dir()),
    "stages": sorted(name for name in tasks.app.tasks if name.startswith("stock_sync.")),
}))
"""


@pytest.mark.slow
def test_the_installed_wheel_migrates_a_database_from_another_folder(
    installed: Path, make_throwaway_database: Callable[[], str], tmp_path: Path
) -> None:
    url = make_throwaway_database()
    options = outside_the_repository(tmp_path, url)
    site_packages = installed.parent.parent / "lib"
    stock_sync_cli = str(installed.with_name("stock-sync"))

    probe = subprocess.run([str(installed), "-c", PROBE], **options)
    assert probe.returncode == 0, show(probe)
    show(probe)
    located = json.loads(probe.stdout)
    for name in ("stock_sync", "tasks", "celeryconfig", "migrations"):
        assert Path(located[name]).is_relative_to(site_packages), (name, located[name])
    assert Path(located["migrations"]).name == MIGRATIONS_PACKAGE
    assert "stock_sync.load_line_items" in located["stages"], located["stages"]

    upgrade = subprocess.run([stock_sync_cli, "db", "upgrade"], **options)
    assert upgrade.returncode == 0, show(upgrade)
    show(upgrade)
    current = subprocess.run([stock_sync_cli, "db", "current", "--json"], **options)
    assert current.returncode == 0, show(current)
    show(current)
    history = subprocess.run([stock_sync_cli, "db", "history"], **options)
    assert history.returncode == 0, show(history)
    show(history)

    head = schema.history()[0].revision  # the source tree's newest revision
    state = json.loads(current.stdout)
    assert (state["current"], state["heads"], state["is_head"]) == ([head], [head], True)
    assert [line.split()[0] for line in history.stdout.splitlines()[2:]] == [
        revision.revision for revision in schema.history()
    ]
    engine = create_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()

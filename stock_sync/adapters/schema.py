"""Schema migrations (alembic), driven from code so no alembic.ini is needed.

The alembic scripts live in ``migrations/`` at the top of the repository and ship inside the
wheel as the package ``stock_sync_migrations`` (pyproject.toml maps one onto the other), so an
installed ``stock-sync db upgrade`` finds them without a checkout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from sqlalchemy import Connection

from stock_sync.adapters.db import build_engine, normalise_database_url

MIGRATIONS_PACKAGE = "stock_sync_migrations"
SOURCE_MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def migrations_dir() -> Path:
    """The folder of alembic's env.py, script.py.mako and versions/.

    The installed package when there is one (a wheel in site-packages, or an editable install,
    which maps the package onto the checkout's migrations/); else the checkout's migrations/
    (the code run from a source tree that was never installed).
    """
    try:
        found = resources.files(MIGRATIONS_PACKAGE)
    except ModuleNotFoundError:
        return SOURCE_MIGRATIONS_DIR
    # Installed wheels are unpacked on disk; alembic needs a real folder, not a Traversable.
    return Path(str(found))


def alembic_config(database_url: str | None = None) -> Config:
    """An alembic Config pointing at our migrations folder and, if given, at a database."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if database_url is not None:
        # configparser treats % as interpolation; URL-encoded passwords contain it.
        config.set_main_option(
            "sqlalchemy.url", normalise_database_url(database_url).replace("%", "%%")
        )
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


# --- what is there: the scripts' history and the database's revision ---------------------------


@dataclass(frozen=True)
class Revision:
    """One migration script."""

    revision: str
    down_revision: str | None
    message: str
    is_head: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DatabaseRevision:
    """The revision(s) a database is at, against the scripts' head(s)."""

    current: tuple[str, ...]  # empty: no schema yet (no alembic_version row)
    heads: tuple[str, ...]

    @property
    def is_head(self) -> bool:
        return bool(self.current) and set(self.current) == set(self.heads)

    def to_dict(self) -> dict[str, Any]:
        return {"current": list(self.current), "heads": list(self.heads), "is_head": self.is_head}


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def _revision(script: Script) -> Revision:
    down = script.down_revision
    return Revision(
        revision=script.revision,
        # Our history is linear; a merge revision would have a tuple, shown joined.
        down_revision=down if down is None or isinstance(down, str) else ", ".join(down),
        # a docstring wrapped over lines is one message (a table row, a JSON string)
        message=" ".join((script.doc or "").split()),
        is_head=script.is_head,
    )


def history() -> list[Revision]:
    """Every migration script, newest first; reads no database."""
    return [_revision(script) for script in _scripts().walk_revisions()]


def current(database_url: str) -> DatabaseRevision:
    """The database's revision(s) and the scripts' head(s); raises SQLAlchemyError when the
    database cannot be read. It only reads: a missing SQLite file is refused (ConfigurationError)
    rather than created, and no version table is created either."""
    engine = build_engine(database_url, read_only=True)
    try:
        with engine.connect() as connection:
            return revision_of(connection)
    finally:
        engine.dispose()


def revision_of(connection: Connection) -> DatabaseRevision:
    """As :func:`current`, on a connection the caller opened (the health check opens its own,
    with short timeouts)."""
    found = MigrationContext.configure(connection).get_current_heads()
    return DatabaseRevision(current=tuple(found), heads=tuple(_scripts().get_heads()))

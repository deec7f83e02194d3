"""Settings from the environment, in one place.

Nothing is read at import time: :func:`get_settings` builds them on first use and a malformed
value is refused with a one-line message naming the variable, an unknown ``STOCK_SYNC_*``
variable (a typo) with one naming the closest setting.

Production fails closed: without ``STOCK_SYNC_DATABASE_URL`` or ``STOCK_SYNC_BROKER_URL`` a
process that needs them refuses to start (:meth:`Settings.require_servers`), unless the embedded
demo set-up is asked for (``STOCK_SYNC_EMBEDDED=1``, or ``stock-sync --embedded``): a SQLite file
and Celery's filesystem transport under ``STOCK_SYNC_DATA_DIR`` stand in for the missing URLs.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stock_sync.adapters.redaction import (
    one_line,
    redact,
    redact_url,
    remember_secrets,
    shown_value,
    url_secrets,
)
from stock_sync.domain.errors import ConfigurationError, UnknownSetting
from stock_sync.domain.retry_policy import RetryPolicy

ENV_PREFIX = "STOCK_SYNC_"
DATABASE_URL_VARIABLE = f"{ENV_PREFIX}DATABASE_URL"
BROKER_URL_VARIABLE = f"{ENV_PREFIX}BROKER_URL"
EMBEDDED_VARIABLE = f"{ENV_PREFIX}EMBEDDED"
# STOCK_SYNC_* variables that are no setting and are not refused: the test suites' own
# (STOCK_SYNC_TEST_POSTGRES_URL, _REDIS_URL, _BROKER, _RABBITMQ_URL, any later one) by prefix,
# and, by name, the tools' variables read outside the settings.
UNCHECKED_PREFIXES = (f"{ENV_PREFIX}TEST_",)
NOT_SETTINGS = {
    f"{ENV_PREFIX}COUNT_SQL_DIR": "the benchmark's SQL counters (adapters/instrumentation.py)",
    f"{ENV_PREFIX}IMAGE_TAG": "the image tag of docker/compose.yaml",
}
DEFAULT_DATA_DIR = Path("data")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Upper bounds: past these a value is a typo or an attack, never a configuration.
ONE_HOUR_S = 3600.0
ONE_DAY_S = 24 * ONE_HOUR_S
ONE_WEEK_S = 7 * ONE_DAY_S
THIRTY_DAYS_S = 30 * ONE_DAY_S
MAX_RETRIES_LIMIT = 1000
MAX_SWEEP_BATCH_SIZE = 10_000
MAX_ALERT_COUNT = 1_000_000
MAX_MICROSERVICE_TIMEOUT_S = 300.0
KIB = 1024
MIB = 1024 * KIB
# Quantities land in 4-byte INTEGER columns (stock levels, ledger deltas); the same bound as
# stock_ledger.MAX_STOCK_QUANTITY (that module pulls in the models; this one stays light).
MAX_QUANTITY = 2**31 - 1
MAX_QUEUE_NAME_CHARS = 200
AMQP_TRANSPORTS = ("amqp", "amqps", "pyamqp")
# The separator and wildcards of RabbitMQ's topic routing keys.
AMQP_TOPIC_CHARACTERS = (".", "*", "#")

SUPPORTED_DATABASES = ("postgresql", "sqlite")
# SQLAlchemy driver names we can open: psycopg2 is the PostgreSQL driver we ship.
_DATABASE_DRIVERS = {
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "postgresql+psycopg2": "postgresql",
    "sqlite": "sqlite",
    "sqlite+pysqlite": "sqlite",
}
# URL settings whose value is shown, redacted, in an error message; a webhook's path and query
# usually are its secret, so only its host is shown.
_URL_FIELDS = {"database_url", "broker_url", "microservice_url"}
_SECRET_PATH_URL_FIELDS = {"alert_webhook_url"}
_DOTTED_CALLABLE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def _seconds(default: float, *, at_most: float = ONE_WEEK_S) -> Any:
    """A finite, positive number of seconds, at most ``at_most``."""
    return Field(default=default, gt=0, le=at_most, allow_inf_nan=False)


def _count(default: int, *, at_least: int, at_most: int) -> Any:
    return Field(default=default, ge=at_least, le=at_most)


def _rate(default: float) -> Any:
    """A ratio in (0, 1]."""
    return Field(default=default, gt=0, le=1, allow_inf_nan=False)


def _retry_limit(default: int) -> Any:
    return _count(default, at_least=0, at_most=MAX_RETRIES_LIMIT)


def _has_unsafe_characters(value: str) -> bool:
    return any(char.isspace() or not char.isprintable() for char in value)


def _queue_name(value: str) -> str:
    if not value or len(value) > MAX_QUEUE_NAME_CHARS or _has_unsafe_characters(value):
        raise ValueError(
            f"must be 1 to {MAX_QUEUE_NAME_CHARS} characters, "
            "without whitespace or control characters"
        )
    return value


def database_kind(url: str) -> str:
    """``postgresql`` or ``sqlite`` for a URL we can open; ValueError (a message without the
    URL, which may carry a password) otherwise."""
    from sqlalchemy.engine import make_url  # only where a URL is checked: keeps settings light

    try:
        drivername = make_url(url).drivername
    except Exception:  # SQLAlchemy raises ArgumentError, ValueError or worse on garbage
        raise ValueError("not a database URL") from None
    kind = _DATABASE_DRIVERS.get(drivername)
    if kind is None:
        raise ValueError(
            f"unsupported database {drivername!r} (supported: {', '.join(SUPPORTED_DATABASES)})"
        )
    return kind


def _http_url(value: str) -> str:
    if _has_unsafe_characters(value):
        raise ValueError("must not contain whitespace or control characters")
    if not value.lower().startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises on a port that is not a number or out of range)
    except ValueError:
        raise ValueError("not a valid URL") from None
    if not parts.hostname:
        raise ValueError("the URL has no host")
    return value


# The URLs and queue names checked for their shape: (the check, whether it may be left empty).
SHAPE_CHECKS: dict[str, tuple[Callable[[str], str], bool]] = {
    "microservice_url": (_http_url, False),
    "alert_webhook_url": (_http_url, True),
    "queue_name": (_queue_name, False),
    "maintenance_queue_name": (_queue_name, True),
}


class Settings(BaseSettings):
    """Every knob of stock-sync. The database and broker URLs have no default: with
    ``embedded`` (STOCK_SYNC_EMBEDDED=1) a missing one is the embedded demo set-up's (a SQLite
    file, Celery's filesystem transport, under ``data_dir``); without it a process that needs
    one refuses to start.

    Every number is finite and bounded (see the README's Configuration table): an absurd
    value is refused at start rather than turned into a week-long sleep or a huge query.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str = ""
    broker_url: str = ""
    # The embedded demo set-up for the URLs left unset: `make demo` and the development
    # commands set it, production never does.
    embedded: bool = False
    microservice_url: str = "http://127.0.0.1:8765"
    microservice_timeout_s: float = _seconds(5.0, at_most=MAX_MICROSERVICE_TIMEOUT_S)
    microservice_deadline_s: float = _seconds(15.0, at_most=ONE_HOUR_S)
    microservice_max_response_bytes: int = _count(MIB, at_least=KIB, at_most=64 * MIB)
    max_line_quantity: int = _count(1_000_000, at_least=1, at_most=MAX_QUANTITY)

    max_retries_pending: int = _retry_limit(10)
    max_retries_processing: int = _retry_limit(8)
    max_retries_deduction: int = _retry_limit(8)
    max_retries_stock_deducted: int = _retry_limit(10)
    max_retries_rollback: int = _retry_limit(10)
    retry_backoff_base_s: float = _seconds(2.0, at_most=ONE_DAY_S)
    retry_backoff_max_s: float = _seconds(600.0, at_most=ONE_DAY_S)

    # A live operation is looked at by the sweep once its message was published this long ago
    # and never started, or its attempt started this long ago and never finished. At least the
    # hard time limit plus the microservice deadline: a running attempt is never taken for a
    # dead one.
    stuck_after_s: float = _seconds(900.0)
    # A retry that waits longer than this waits in the database row (next_retry_at), not as a
    # countdown message held in a worker's memory; beat re-enqueues it when it is due.
    retry_park_after_s: float = _seconds(30.0, at_most=ONE_DAY_S)
    # How often beat re-enqueues the parked retries that are due.
    retry_release_interval_s: float = _seconds(5.0, at_most=ONE_HOUR_S)
    # The marketplace audit (beat; `stock-sync check --marketplace`): how often, over which
    # window of settled operations, how fast it reads orders (Allegro allows 9,000 requests
    # a minute per client, shared with the pipeline), in batches of how many, and whether
    # beat's run repairs what it finds.
    marketplace_audit_interval_s: float = _seconds(ONE_HOUR_S)
    marketplace_audit_window_s: float = _seconds(2 * ONE_HOUR_S, at_most=THIRTY_DAYS_S)
    marketplace_audit_rate_per_s: float = Field(default=10.0, gt=0, le=150, allow_inf_nan=False)
    marketplace_audit_batch_size: int = _count(200, at_least=1, at_most=MAX_SWEEP_BATCH_SIZE)
    marketplace_audit_repair: bool = True
    sweep_batch_size: int = _count(200, at_least=1, at_most=MAX_SWEEP_BATCH_SIZE)
    sweep_interval_s: float = _seconds(60.0)
    alert_interval_s: float = _seconds(60.0)
    # A firing alert is notified again this often until it clears (its state is in the
    # database, so a restart or a second beat host does not re-send it).
    alert_repeat_s: float = _seconds(ONE_HOUR_S)
    log_level: str = "INFO"
    queue_name: str = "stock_sync"
    # Beat's sweep, alerts and reconciliation get a queue of their own, so a pipeline backlog
    # cannot hold them until they expire; empty: "<queue_name>_maintenance".
    maintenance_queue_name: str = ""
    # Celery task events cost the worker about 6 ms per operation; Flower turns them on by
    # itself when it runs, so they stay off unless asked for.
    task_events: bool = False
    notification_sender: str = ""

    task_soft_time_limit_s: float = _seconds(60.0)
    task_time_limit_s: float = _seconds(90.0)

    alert_webhook_url: str = ""
    alert_window_s: float = _seconds(3600.0, at_most=THIRTY_DAYS_S)
    alert_stuck_threshold: int = _count(1, at_least=1, at_most=MAX_ALERT_COUNT)
    alert_error_rate_threshold: float = _rate(0.2)
    alert_processing_time_threshold_s: float = _seconds(300.0)
    alert_cancellation_rate_threshold: float = _rate(0.1)
    alert_min_operations: int = _count(10, at_least=1, at_most=MAX_ALERT_COUNT)
    metrics_cache_s: float = Field(default=5.0, ge=0, le=ONE_HOUR_S, allow_inf_nan=False)
    # A worker rewrites this file every interval (its liveness, read by `stock-sync health
    # --only worker` without the broker); empty: see effective_worker_heartbeat_file.
    worker_heartbeat_file: str = ""
    worker_heartbeat_interval_s: float = _seconds(10.0, at_most=ONE_HOUR_S)

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str) -> str:
        if value:
            database_kind(value)
        return value

    @field_validator("broker_url")
    @classmethod
    def _known_broker_transport(cls, value: str) -> str:
        if not value:
            return value
        from kombu.transport import TRANSPORT_ALIASES

        scheme, separator, _ = value.partition("://")
        if not separator or _has_unsafe_characters(value):
            raise ValueError("not a broker URL (transport://...)")
        transport = scheme.split("+", 1)[0]
        if transport not in TRANSPORT_ALIASES:
            raise ValueError(f"unknown broker transport {transport!r} (e.g. redis, filesystem)")
        return value

    @field_validator(*SHAPE_CHECKS)
    @classmethod
    def _checked_shape(cls, value: str, info: ValidationInfo) -> str:
        check, optional = SHAPE_CHECKS[str(info.field_name)]
        return value if optional and not value else check(value)

    @field_validator("worker_heartbeat_file")
    @classmethod
    def _printable_path(cls, value: str) -> str:
        if any(not char.isprintable() for char in value):
            raise ValueError("must not contain control characters")
        return value

    @field_validator("notification_sender")
    @classmethod
    def _dotted_callable(cls, value: str) -> str:
        if value and not _DOTTED_CALLABLE.fullmatch(value):
            raise ValueError("must be module.path:function")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """Settings that bound each other; each message names the variable to change."""
        if self.retry_backoff_max_s < self.retry_backoff_base_s:
            raise ValueError(
                "STOCK_SYNC_RETRY_BACKOFF_MAX_S must be >= STOCK_SYNC_RETRY_BACKOFF_BASE_S"
            )
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            raise ValueError(
                "STOCK_SYNC_TASK_SOFT_TIME_LIMIT_S must be below STOCK_SYNC_TASK_TIME_LIMIT_S"
                " (the soft limit lets a task clean up before the hard one kills it)"
            )
        if self.microservice_deadline_s < self.microservice_timeout_s:
            raise ValueError(
                "STOCK_SYNC_MICROSERVICE_DEADLINE_S must be >= STOCK_SYNC_MICROSERVICE_TIMEOUT_S"
                " (the deadline bounds a whole request, the timeout one read)"
            )
        if self.stuck_after_s < self.task_time_limit_s + self.microservice_deadline_s:
            raise ValueError(
                "STOCK_SYNC_STUCK_AFTER_S must be >= STOCK_SYNC_TASK_TIME_LIMIT_S +"
                f" STOCK_SYNC_MICROSERVICE_DEADLINE_S ({self.task_time_limit_s:g} +"
                f" {self.microservice_deadline_s:g}): an attempt still running would be taken"
                " for a dead one"
            )
        if self.effective_maintenance_queue_name == self.queue_name:
            raise ValueError(
                "STOCK_SYNC_MAINTENANCE_QUEUE_NAME must differ from STOCK_SYNC_QUEUE_NAME"
                " (maintenance has a queue of its own so that a backlog cannot starve it)"
            )
        if self.uses_amqp_broker:
            for variable, name in (
                ("QUEUE_NAME", self.queue_name),
                ("MAINTENANCE_QUEUE_NAME", self.effective_maintenance_queue_name),
            ):
                if any(char in name for char in AMQP_TOPIC_CHARACTERS):
                    raise ValueError(
                        f"{ENV_PREFIX}{variable}: on RabbitMQ a queue name must not contain"
                        " '.', '*' or '#' (its delayed retries are routed by topic patterns"
                        f" on the name; got {name!r})"
                    )
        return self

    def secrets(self) -> list[str]:
        """Passwords and tokens in the configured URLs: masked in every message and log."""
        found = [
            secret
            for url in (self.database_url, self.broker_url, self.microservice_url)
            for secret in url_secrets(url)
        ]
        return found + url_secrets(self.alert_webhook_url, path_is_secret=True)

    def missing_servers(self, *, database: bool = True, broker: bool = True) -> list[str]:
        """The URL variables a process needing ``database`` and ``broker`` lacks (none with
        the embedded set-up)."""
        if self.embedded:
            return []
        wanted = (
            (database, self.database_url, DATABASE_URL_VARIABLE),
            (broker, self.broker_url, BROKER_URL_VARIABLE),
        )
        return [variable for needed, url, variable in wanted if needed and not url]

    def require_servers(self, *, database: bool = True, broker: bool = True) -> None:
        """ConfigurationError naming the missing URL variables (one line), if any."""
        missing = self.missing_servers(database=database, broker=broker)
        if missing:
            raise ConfigurationError(missing_servers_message(missing))

    @property
    def effective_database_url(self) -> str:
        """The configured URL, or with the embedded set-up a SQLite file under the data
        folder; ConfigurationError naming STOCK_SYNC_DATABASE_URL otherwise."""
        if self.database_url:
            return self.database_url
        self.require_servers(database=True, broker=False)
        return f"sqlite:///{(self.data_dir / 'stock_sync.sqlite3').resolve()}"

    @property
    def uses_sqlite_database(self) -> bool:
        """The configured database is SQLite, or the embedded set-up's (never raises)."""
        if self.database_url:
            return database_kind(self.database_url) == "sqlite"
        return self.embedded

    @property
    def effective_worker_heartbeat_file(self) -> Path:
        """The configured heartbeat file, or one in the temporary folder named after the queue
        (one file per worker: give each worker of a host its own)."""
        if self.worker_heartbeat_file:
            return Path(self.worker_heartbeat_file)
        folder = Path(tempfile.gettempdir()) / f"stock-sync-{os.getuid()}"
        return folder / f"{self.queue_name}-worker.heartbeat"

    @property
    def effective_maintenance_queue_name(self) -> str:
        """The configured maintenance queue, or ``<queue_name>_maintenance``."""
        return self.maintenance_queue_name or f"{self.queue_name}_maintenance"

    @property
    def effective_broker_url(self) -> str:
        """The configured broker, or with the embedded set-up Celery's filesystem transport
        under the data folder; ConfigurationError naming STOCK_SYNC_BROKER_URL otherwise."""
        if self.broker_url:
            return self.broker_url
        self.require_servers(database=False, broker=True)
        return "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def uses_filesystem_broker(self) -> bool:
        """The configured broker is Celery's filesystem transport, or the embedded set-up's
        (never raises)."""
        if self.broker_url:
            return self.broker_url.startswith("filesystem://")
        return self.embedded

    @property
    def uses_amqp_broker(self) -> bool:
        """RabbitMQ (kombu's amqp, amqps and pyamqp transports)."""
        return self.broker_url.partition("://")[0] in AMQP_TRANSPORTS

    def retry_policy(self, stage: str) -> RetryPolicy:
        """The retry budget of a stage (``Stage.retry_budget``): pending (load_line_items),
        processing (validate_stock), deduction (deduct_stock), stock_deducted
        (sync_microservice) or rollback."""
        limits = {
            "pending": self.max_retries_pending,
            "processing": self.max_retries_processing,
            "deduction": self.max_retries_deduction,
            "stock_deducted": self.max_retries_stock_deducted,
            "rollback": self.max_retries_rollback,
        }
        return RetryPolicy(
            max_retries=limits[stage],
            base_s=self.retry_backoff_base_s,
            max_s=self.retry_backoff_max_s,
        )

    # Sentry (SENTRY_DSN, stock_sync/adapters/error_reporting.py): beat's schedule reported as
    # cron monitors, each run checked in by beat and out by the worker that ran it.
    sentry_crons: bool = False


def _shown_input(field: str, value: object) -> str:
    """How the refused value is quoted: redacted before it is quoted (quoting escapes
    characters, which would hide a password from the patterns), then cut to a sane length."""
    if not isinstance(value, str):
        return shown_value(value)
    if field in _SECRET_PATH_URL_FIELDS:
        return shown_value(redact_url(value, path_is_secret=True))
    if field in _URL_FIELDS:
        return shown_value(redact_url(value))
    return shown_value(redact(value, url_secrets(value)))


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    message = first["msg"].removeprefix("Value error, ")
    if not field:
        return message
    value = first.get("input")
    shown = f" (got {_shown_input(field, value)})" if isinstance(value, str | int | float) else ""
    return f"{ENV_PREFIX}{field.upper()}: {message}{shown}"


def missing_servers_message(missing: list[str]) -> str:
    """Refusing to start without the URL variables ``missing``: what to set instead."""
    what = {
        DATABASE_URL_VARIABLE: ("no database", f"{DATABASE_URL_VARIABLE} (PostgreSQL)"),
        BROKER_URL_VARIABLE: ("no broker", f"{BROKER_URL_VARIABLE} (Redis or RabbitMQ)"),
    }
    lacking = " and ".join(what[variable][0] for variable in missing)
    to_set = " and ".join(what[variable][1] for variable in missing)
    return (
        f"{lacking} configured: set {to_set}, or {EMBEDDED_VARIABLE}=1 (stock-sync --embedded)"
        f" for the embedded demo set-up under {ENV_PREFIX}DATA_DIR"
    )


def known_variables() -> set[str]:
    """Every STOCK_SYNC_* variable that is a setting or known not to be one."""
    return {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields} | set(NOT_SETTINGS)


def check_variables(environment: Mapping[str, str]) -> None:
    """UnknownSetting naming the first STOCK_SYNC_* variable of ``environment`` that is no
    setting (the settings read names in any case, so this does too) and the closest one."""
    known = known_variables()
    unknown = sorted(
        name
        for name in environment
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() not in known
        and not name.upper().startswith(UNCHECKED_PREFIXES)
    )
    if not unknown:
        return
    name = one_line(unknown[0])
    close = difflib.get_close_matches(name.upper(), sorted(known - set(NOT_SETTINGS)), n=1)
    hint = f"did you mean {close[0]}?" if close else "see the README's Configuration table"
    more = f"; {len(unknown) - 1} more unknown" if len(unknown) > 1 else ""
    raise UnknownSetting(f"unknown setting {name} ({hint}){more}")


def load_settings() -> Settings:
    """Read the environment now; raise ConfigurationError naming a malformed variable, and
    UnknownSetting naming one that is no setting.

    The message is one line and never carries a password or a token.
    """
    check_variables(os.environ)
    try:
        return Settings()
    except ValidationError as error:
        described = one_line(redact(_describe(error)))
        raise ConfigurationError(f"invalid configuration: {described}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once on first use; their secrets are remembered so that
    no message or log record of this process shows them."""
    settings = load_settings()
    remember_secrets(settings.secrets())
    return settings


@contextmanager
def exit_on_configuration_error() -> Iterator[None]:
    """For entry points that are not our CLI (Celery importing ``tasks`` or ``celeryconfig``):
    a bad setting ends the process with the one-line message instead of a traceback."""
    try:
        yield
    except ConfigurationError as error:
        # Printed here rather than as SystemExit's message, so it goes to sys.stderr as the
        # process (or a test runner capturing it) has set it up.
        print(f"error: {one_line(redact(str(error)))}", file=sys.stderr)
        raise SystemExit(EXIT_UNKNOWN_SETTING if isinstance(error, UnknownSetting) else 1) from None


# An unknown variable is a usage error, as the command line's are.
EXIT_UNKNOWN_SETTING = 2


def prepare_broker_folders(settings: Settings) -> None:
    """The filesystem transport's folders, created when missing (by the processes that use
    the broker: a worker, beat, a producer; never a command that only reads)."""
    if not settings.uses_filesystem_broker:
        return
    prepared_data_dir(settings)
    try:
        for sub in ("queue", "processed", "control"):
            (settings.broker_folder / sub).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigurationError(
            f"{ENV_PREFIX}DATA_DIR: cannot create the broker folder {settings.broker_folder}:"
            f" {error.strerror or error}"
        ) from None


def prepared_data_dir(settings: Settings) -> Path:
    """The data folder, created when missing; ConfigurationError naming STOCK_SYNC_DATA_DIR
    when it is a file, cannot be created or cannot be written."""
    variable = f"{ENV_PREFIX}DATA_DIR"
    try:
        folder = settings.data_dir.resolve()
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        shown = one_line(str(settings.data_dir))
        raise ConfigurationError(f"{variable}: {shown} is a file, not a folder") from None
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop on resolve()
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigurationError(
            f"{variable}: cannot create the folder {one_line(str(settings.data_dir))}: {reason}"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{variable}: cannot write to the folder {folder}")
    return folder

"""Settings from the environment, in one place.

Nothing is read at import time: :func:`get_settings` builds them on first use and a malformed
value is refused with a one-line message naming the variable.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stock_sync.domain.errors import ConfigurationError
from stock_sync.domain.retry_policy import RetryPolicy

ENV_PREFIX = "STOCK_SYNC_"
DEFAULT_DATA_DIR = Path("data")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Settings(BaseSettings):
    """Every knob of stock-sync; the defaults run embedded (SQLite + filesystem broker)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str = ""
    broker_url: str = ""
    microservice_url: str = "http://127.0.0.1:8765"
    microservice_timeout_s: float = Field(default=5.0, gt=0)

    max_retries_pending: int = Field(default=10, ge=0)
    max_retries_processing: int = Field(default=8, ge=0)
    max_retries_deduction: int = Field(default=8, ge=0)
    max_retries_stock_deducted: int = Field(default=10, ge=0)
    max_retries_rollback: int = Field(default=10, ge=0)
    retry_backoff_base_s: float = Field(default=2.0, gt=0)
    retry_backoff_max_s: float = Field(default=600.0, gt=0)

    stuck_after_s: float = Field(default=900.0, gt=0)
    sweep_batch_size: int = Field(default=200, ge=1)
    sweep_interval_s: float = Field(default=60.0, gt=0)
    alert_interval_s: float = Field(default=60.0, gt=0)
    log_level: str = "INFO"
    queue_name: str = "stock_sync"
    notification_sender: str = ""

    task_soft_time_limit_s: float = Field(default=60.0, gt=0)
    task_time_limit_s: float = Field(default=90.0, gt=0)

    alert_webhook_url: str = ""
    alert_window_s: float = Field(default=3600.0, gt=0)
    alert_stuck_threshold: int = Field(default=1, ge=1)
    alert_error_rate_threshold: float = Field(default=0.2, gt=0, le=1)
    alert_processing_time_threshold_s: float = Field(default=300.0, gt=0)
    alert_cancellation_rate_threshold: float = Field(default=0.1, gt=0, le=1)
    alert_min_operations: int = Field(default=10, ge=1)
    metrics_cache_s: float = Field(default=5.0, ge=0)

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @model_validator(mode="after")
    def _backoff_bounds(self) -> Settings:
        if self.retry_backoff_max_s < self.retry_backoff_base_s:
            raise ValueError(
                "STOCK_SYNC_RETRY_BACKOFF_MAX_S must be >= STOCK_SYNC_RETRY_BACKOFF_BASE_S"
            )
        return self

    @property
    def effective_database_url(self) -> str:
        """The configured URL, or a SQLite file under the data folder."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'stock_sync.sqlite3').resolve()}"

    @property
    def effective_broker_url(self) -> str:
        """The configured broker, or Celery's filesystem transport under the data folder."""
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.effective_broker_url.startswith("filesystem://")

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


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    message = first["msg"].removeprefix("Value error, ")
    if not field:
        return message
    value = first.get("input")
    shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
    return f"{ENV_PREFIX}{field.upper()}: {message}{shown}"


def load_settings() -> Settings:
    """Read the environment now; raise ConfigurationError naming a malformed variable."""
    try:
        return Settings()
    except ValidationError as error:
        raise ConfigurationError(f"invalid configuration: {_describe(error)}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once on first use."""
    return load_settings()

"""``stock-sync settings``: every setting of the settings model, its variable, default, bounds
and meaning.

Names, defaults and numeric bounds are read from the model (``Settings.model_fields``), so they
cannot drift from it; what pydantic's field metadata cannot say (a validator's rule, a default
computed when the value is empty, what the setting is for) is written here, one entry per
field. ``--markdown`` prints the README's Configuration table (tests/unit/test_readme.py checks
that the two are equal); a field without a meaning here is refused, so a new setting cannot be
added undocumented.

cli.py adds the ``settings`` command to ``stock-sync``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import annotated_types
import click

from stock_sync.adapters.settings import (
    ENV_PREFIX,
    LOG_LEVELS,
    MAX_QUEUE_NAME_CHARS,
    SUPPORTED_DATABASES,
    Settings,
)

BOOLEAN_WORDS = "on/off, true/false, 1/0"
QUEUE_NAME_RULE = f"1-{MAX_QUEUE_NAME_CHARS} characters, no whitespace"
HTTP_URL = "`http://` or `https://`"

# What a field's metadata cannot say: the rule of its validator, or a bound set by another
# setting (Settings._consistent).
RULES: dict[str, str] = {
    "data_dir": "a writable folder (created if missing)",
    "database_url": " or ".join(f"`{kind}://`" for kind in SUPPORTED_DATABASES),
    "broker_url": "a kombu transport URL",
    "microservice_url": HTTP_URL,
    "microservice_deadline_s": ">= the timeout",
    "retry_backoff_max_s": ">= the base",
    "stuck_after_s": ">= the hard time limit + the microservice deadline",
    "log_level": ", ".join(LOG_LEVELS),
    "queue_name": f"{QUEUE_NAME_RULE}; on RabbitMQ no `.`, `*`, `#`",
    "maintenance_queue_name": f"{QUEUE_NAME_RULE}, not the pipeline queue",
    "notification_sender": "`module.path:function`",
    "task_soft_time_limit_s": "< the hard limit",
    "alert_webhook_url": HTTP_URL,
    "worker_heartbeat_file": "a path, no control characters",
}

# Defaults the model leaves empty and works out when the value is needed.
COMPUTED_DEFAULTS: dict[str, str] = {
    "database_url": "none: required (embedded: SQLite file `data/stock_sync.sqlite3`)",
    "broker_url": "none: required (embedded: `filesystem://` under `data/broker`)",
    "maintenance_queue_name": "`<queue>_maintenance`",
    "worker_heartbeat_file": "`<temp dir>/stock-sync-<uid>/<queue>-worker.heartbeat`",
}

MEANINGS: dict[str, str] = {
    "data_dir": "embedded database, broker folder, beat schedule, sweep lock",
    "database_url": "the source of truth (PostgreSQL in production)",
    "broker_url": "Celery broker (Redis or RabbitMQ in production)",
    "embedded": "the embedded demo set-up for the URLs left unset (also `stock-sync"
    " --embedded`); `make demo` and the development targets set it, production never",
    "microservice_url": "the Allegro microservice",
    "microservice_timeout_s": "read timeout of one request (connect: min(this, 3))",
    "microservice_deadline_s": "total time one request may take",
    "microservice_max_response_bytes": "the largest answer read from the microservice",
    "max_line_quantity": "the largest quantity one order line may ask for",
    "max_retries_pending": "retries of `load_line_items`",
    "max_retries_processing": "retries of `validate_stock`",
    "max_retries_deduction": "retries of `deduct_stock`",
    "max_retries_stock_deducted": "retries of `sync_microservice`",
    "max_retries_rollback": "retries of the microservice `rollback`",
    "retry_backoff_base_s": "first backoff (exponential, with jitter)",
    "retry_backoff_max_s": "backoff cap",
    "stuck_after_s": "the sweep looks at an operation whose message was published, or whose"
    " attempt started, this long ago without progress",
    "retry_park_after_s": "a longer retry wait is parked in the database row, not held as a"
    " countdown message",
    "retry_release_interval_s": "how often beat re-enqueues the parked retries that are due",
    "marketplace_audit_interval_s": "how often beat runs the marketplace audit",
    "marketplace_audit_window_s": "the audit reads the operations settled this long ago",
    "marketplace_audit_rate_per_s": "order reads a second at most (shared with the pipeline)",
    "marketplace_audit_batch_size": "orders read per batch",
    "marketplace_audit_repair": "beat's audit repairs the drift it finds",
    "sweep_batch_size": "stuck operations claimed per sweep batch",
    "sweep_interval_s": "how often beat runs the stuck sweep",
    "alert_interval_s": "how often beat evaluates the alerts",
    "alert_repeat_s": "a firing alert is notified again this often until it clears",
    "log_level": "worker and beat (unless `--loglevel` is given), metrics server",
    "queue_name": "the Celery queue of the pipeline (stages, rollbacks)",
    "maintenance_queue_name": "the Celery queue of beat's tasks (sweep, release, alerts,"
    " audit, reconciliation)",
    "task_events": "Celery task events from the start (Flower switches them on itself)",
    "notification_sender": "called with each notification, after the commit",
    "task_soft_time_limit_s": "Celery soft time limit of a task",
    "task_time_limit_s": "Celery hard time limit of a task",
    "alert_webhook_url": "alert notices are POSTed here as JSON",
    "alert_window_s": "the window of `stock-sync stats` and the in-app alerts",
    "alert_stuck_threshold": "stuck operations that fire the alert",
    "alert_error_rate_threshold": "failed / settled order deductions that fire the alert",
    "alert_processing_time_threshold_s": "p95 creation to completion that fires the alert",
    "alert_cancellation_rate_threshold": "cancelled / created that fires the alert",
    "alert_min_operations": "ratios are judged only above this many",
    "metrics_cache_s": "the metrics server reuses one computation this long",
    "worker_heartbeat_file": "the file a worker rewrites every interval (`stock-sync health"
    " --only worker`); one per worker process",
    "worker_heartbeat_interval_s": "how often; a file older than 3 intervals is a dead worker",
    "sentry_crons": "beat's schedule reported as Sentry cron monitors (with `SENTRY_DSN`)",
}

DURATIONS = ((7 * 86400, "week"), (86400, "day"), (3600, "hour"))


@dataclass(frozen=True)
class SettingRow:
    variable: str
    default: Any
    shown_default: str
    bounds: str
    meaning: str


def setting_rows() -> list[SettingRow]:
    """One row per field of the model, in the model's order; KeyError names a field that has
    no meaning written above."""
    missing = sorted(set(Settings.model_fields) - set(MEANINGS))
    if missing:
        raise KeyError(f"settings without a meaning in cli_settings.MEANINGS: {missing}")
    return [_row(name) for name in Settings.model_fields]


def _row(name: str) -> SettingRow:
    field = Settings.model_fields[name]
    default = str(field.default) if isinstance(field.default, Path) else field.default
    bounds = "; ".join(filter(None, (_numeric_bounds(name, field.metadata), RULES.get(name))))
    if field.annotation is bool:
        bounds = BOOLEAN_WORDS
    return SettingRow(
        variable=f"{ENV_PREFIX}{name.upper()}",
        default=default,
        shown_default=COMPUTED_DEFAULTS.get(name) or _shown(default),
        bounds=bounds,
        meaning=MEANINGS[name],
    )


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "`on`" if value else "`off`"
    if value == "":
        return "none"
    return f"`{_number(value) if isinstance(value, float) else value}`"


def _number(value: float) -> str:
    """``3600`` for 3600.0, ``0.2`` for 0.2."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _numeric_bounds(name: str, metadata: Iterable[Any]) -> str:
    """``(0, 300]`` for a float, ``0 .. 1000`` for an int, from pydantic's field metadata."""
    low = high = None
    low_open = high_open = False
    for item in metadata:
        if isinstance(item, annotated_types.Gt | annotated_types.Ge):
            low, low_open = getattr(item, "gt", getattr(item, "ge", None)), hasattr(item, "gt")
        if isinstance(item, annotated_types.Lt | annotated_types.Le):
            high, high_open = getattr(item, "lt", getattr(item, "le", None)), hasattr(item, "lt")
    if low is None or high is None:
        return ""
    if isinstance(low, int) and isinstance(high, int) and not (low_open or high_open):
        return f"{low} .. {high}"
    shown = f"{'(' if low_open else '['}{_number(low)}, {_number(high)}{')' if high_open else ']'}"
    return shown + _as_duration(high) if name.endswith("_s") else shown


def _as_duration(seconds: float) -> str:
    for unit_s, unit in DURATIONS:
        if seconds >= unit_s and seconds % unit_s == 0:
            count = int(seconds // unit_s)
            return f" ({count} {unit}{'s' if count > 1 else ''})"
    return ""


def markdown_table(rows: list[SettingRow]) -> str:
    """The README's Configuration table."""
    lines = ["| variable | default | bounds | meaning |", "|---|---|---|---|"]
    for row in rows:
        cells = (f"`{row.variable}`", row.shown_default, row.bounds or "-", row.meaning)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def _plain(text: str) -> str:
    """Markdown's code quotes left out, for the terminal and JSON."""
    return text.replace("`", "")


def human_listing(rows: list[SettingRow]) -> str:
    blocks = [
        f"{row.variable} = {_plain(row.shown_default)}\n    {_plain(row.meaning)}"
        + (f"\n    bounds: {_plain(row.bounds)}" if row.bounds else "")
        for row in rows
    ]
    return "\n".join(blocks)


def json_listing(rows: list[SettingRow]) -> list[dict[str, Any]]:
    return [
        {**asdict(row), **{key: _plain(getattr(row, key)) for key in PLAIN_FIELDS}} for row in rows
    ]


PLAIN_FIELDS = ("shown_default", "bounds", "meaning")


@click.command("settings")
@click.option("--markdown", is_flag=True, help="Print the README's Configuration table.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of settings.")
def settings(markdown: bool, as_json: bool) -> None:
    """List every setting (environment variable) with its default, bounds and meaning.

    Shows the model's defaults, not this environment's values.
    """
    if markdown and as_json:
        raise click.UsageError("--markdown and --json exclude each other")
    rows = setting_rows()
    if as_json:
        click.echo(json.dumps(json_listing(rows), indent=2))
    elif markdown:
        click.echo(markdown_table(rows))
    else:
        click.echo(human_listing(rows))

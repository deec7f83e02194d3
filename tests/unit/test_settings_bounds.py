"""Every setting is finite and bounded, refused at start with one line naming the variable,
and no refusal quotes a password or a token."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stock_sync.adapters.settings import Settings, load_settings, prepared_data_dir
from stock_sync.domain.errors import ConfigurationError
from tests.settings_support import DOCUMENTED_BOUNDS, environment

README = Path(__file__).resolve().parents[2] / "README.md"


def refusal(**variables: str) -> str:
    with environment(variables), pytest.raises(ConfigurationError) as raised:
        load_settings()
    message = str(raised.value)
    assert message.startswith("invalid configuration: ") and len(message.splitlines()) == 1
    return message


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        # cases from the field
        ("STOCK_SYNC_RETRY_BACKOFF_MAX_S", "inf", "finite"),
        ("STOCK_SYNC_ALERT_WINDOW_S", "1e300", "less than or equal to 2592000"),
        ("STOCK_SYNC_MICROSERVICE_TIMEOUT_S", "inf", "finite"),
        ("STOCK_SYNC_SWEEP_BATCH_SIZE", "1" + "0" * 30, "less than or equal to 10000"),
        # and their neighbours
        ("STOCK_SYNC_STUCK_AFTER_S", "nan", "finite"),
        ("STOCK_SYNC_RETRY_BACKOFF_BASE_S", "-inf", "finite"),
        ("STOCK_SYNC_RETRY_BACKOFF_MAX_S", "86401", "less than or equal to 86400"),
        ("STOCK_SYNC_SWEEP_INTERVAL_S", "604801", "less than or equal to 604800"),
        ("STOCK_SYNC_MAX_RETRIES_DEDUCTION", "1001", "less than or equal to 1000"),
        ("STOCK_SYNC_ALERT_ERROR_RATE_THRESHOLD", "1.5", "less than or equal to 1"),
        ("STOCK_SYNC_ALERT_CANCELLATION_RATE_THRESHOLD", "0", "greater than 0"),
        ("STOCK_SYNC_ALERT_MIN_OPERATIONS", "10000001", "less than or equal to 1000000"),
        ("STOCK_SYNC_METRICS_CACHE_S", "inf", "finite"),
        ("STOCK_SYNC_TASK_TIME_LIMIT_S", "1e9", "less than or equal to 604800"),
        ("STOCK_SYNC_MICROSERVICE_DEADLINE_S", "inf", "finite"),
        ("STOCK_SYNC_MICROSERVICE_MAX_RESPONSE_BYTES", "1023", "greater than or equal to 1024"),
        ("STOCK_SYNC_MICROSERVICE_MAX_RESPONSE_BYTES", str(64 * 2**20 + 1), "less than or equal"),
        ("STOCK_SYNC_MAX_LINE_QUANTITY", "0", "greater than or equal to 1"),
        ("STOCK_SYNC_MAX_LINE_QUANTITY", str(2**31), "less than or equal to 2147483647"),
        ("STOCK_SYNC_QUEUE_NAME", "two words", "without whitespace"),
        ("STOCK_SYNC_QUEUE_NAME", "", "1 to 200 characters"),
        ("STOCK_SYNC_NOTIFICATION_SENDER", "not a path", "module.path:function"),
        ("STOCK_SYNC_BROKER_URL", "carrier-pigeon://loft", "unknown broker transport"),
        ("STOCK_SYNC_MICROSERVICE_URL", "localhost:8765", "http:// or https://"),
        ("STOCK_SYNC_ALERT_WEBHOOK_URL", "https://", "no host"),
    ],
)
def test_absurd_values_are_refused_naming_the_variable(
    variable: str, value: str, reason: str
) -> None:
    message = refusal(**{variable: value})
    assert f"{variable}: " in message and reason in message


def test_an_unsupported_database_says_which_are_supported() -> None:
    message = refusal(STOCK_SYNC_DATABASE_URL="mysql://stock:S3CRETPW@db-host/stock")
    assert "STOCK_SYNC_DATABASE_URL: unsupported database 'mysql'" in message
    assert "(supported: postgresql, sqlite)" in message and "S3CRETPW" not in message


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        (
            {"STOCK_SYNC_TASK_SOFT_TIME_LIMIT_S": "90", "STOCK_SYNC_TASK_TIME_LIMIT_S": "90"},
            "STOCK_SYNC_TASK_SOFT_TIME_LIMIT_S must be below STOCK_SYNC_TASK_TIME_LIMIT_S",
        ),
        (
            {"STOCK_SYNC_MICROSERVICE_TIMEOUT_S": "20"},
            "STOCK_SYNC_MICROSERVICE_DEADLINE_S must be >= STOCK_SYNC_MICROSERVICE_TIMEOUT_S",
        ),
    ],
)
def test_settings_that_bound_each_other_are_checked_together(
    variables: dict[str, str], named: str
) -> None:
    assert named in refusal(**variables)


def test_the_new_microservice_and_quantity_settings_have_their_defaults() -> None:
    with environment({}):
        settings = load_settings()
    assert settings.microservice_deadline_s == 15
    assert settings.microservice_max_response_bytes == 1_048_576
    assert settings.max_line_quantity == 1_000_000


@pytest.mark.parametrize(
    ("variable", "value", "secret"),
    [
        ("STOCK_SYNC_DATABASE_URL", "postgresql://u:S3CRETPW@db-host:xx/stock", "S3CRETPW"),
        ("STOCK_SYNC_DATABASE_URL", "oracle://u:S3CRETPW@db-host/stock", "S3CRETPW"),
        ("STOCK_SYNC_MICROSERVICE_URL", "ftp://svc:S3CRETPW@allegro/", "S3CRETPW"),
        ("STOCK_SYNC_MICROSERVICE_URL", "http://svc:S3CRETPW@allegro:port/", "S3CRETPW"),
        ("STOCK_SYNC_BROKER_URL", "nonsense://:S3CRETPW@redis-host:6379/0", "S3CRETPW"),
        (
            "STOCK_SYNC_ALERT_WEBHOOK_URL",
            "https://hooks.example.com/services/T0/B0/XOXBTOKEN1234 extra",
            "XOXBTOKEN1234",
        ),
        (
            "STOCK_SYNC_ALERT_WEBHOOK_URL",
            "ftp://hooks.example.com/hook?token=XOXBTOKEN1234",
            "XOXBTOKEN1234",
        ),
    ],
)
def test_a_refused_url_is_quoted_without_its_secret(variable: str, value: str, secret: str) -> None:
    message = refusal(**{variable: value})
    assert variable in message and secret not in message


def test_the_readme_documents_every_setting_with_its_bounds() -> None:
    # The table is generated from the model (tests/test_readme.py): every setting is in it,
    # among them each one whose bounds these tests check.
    section = README.read_text().split("<!-- settings-table:begin", 1)[1]
    table = section.split("<!-- settings-table:end -->", 1)[0]
    documented = set(re.findall(r"`(STOCK_SYNC_[A-Z0-9_]+)`", table))
    assert documented == {f"STOCK_SYNC_{name.upper()}" for name in Settings.model_fields}
    assert set(DOCUMENTED_BOUNDS) <= documented


def test_a_data_dir_that_is_a_file_is_refused_naming_it(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    with environment({"STOCK_SYNC_DATA_DIR": str(afile)}):
        settings = load_settings()
    with pytest.raises(ConfigurationError, match=r"STOCK_SYNC_DATA_DIR: .* is a file"):
        prepared_data_dir(settings)


@pytest.mark.parametrize("place", ["{tmp}/afile/below", "/proc/stock-sync-data"])
def test_a_data_dir_that_cannot_be_created_is_refused_naming_it(tmp_path: Path, place: str) -> None:
    (tmp_path / "afile").write_text("")
    with environment({"STOCK_SYNC_DATA_DIR": place.format(tmp=tmp_path)}):
        settings = load_settings()
    with pytest.raises(ConfigurationError, match=r"STOCK_SYNC_DATA_DIR: cannot create"):
        prepared_data_dir(settings)

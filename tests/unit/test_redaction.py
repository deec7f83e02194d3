"""The one redaction helper: URL passwords, secret query values and known secrets are masked in
any percent-encoding; user text becomes one printable line."""

from __future__ import annotations

import pytest

from stock_sync.adapters.redaction import one_line, redact, redact_url, shown_value, url_secrets
from stock_sync.adapters.settings import get_settings
from tests.settings_support import environment

WEBHOOK = "https://hooks.example.com/services/T0AB/B0CD/XoXbSeCrEt%2Ftok%20en?sig=S1GNATURE"


@pytest.mark.parametrize(
    "text",
    [
        "connect to postgresql://stock:S3CRETPW@db-host/stock failed",
        "redis://:S3CRETPW@redis-host:6379/0 refused",
        "bad url 'postgresql://u:S3CRETPW@h:xx/db'",
        "sloppy postgresql://u:S3CRET@PW@h/db",  # an unescaped @ inside the password
        "GET /x?access_token=S3CRETPW&page=2",
        "GET /x?api_key=S3CRETPW",
        "://u:S3CRETPW@h",
    ],
)
def test_credentials_in_urls_are_masked_without_knowing_them(text: str) -> None:
    assert "S3CRET" not in redact(text) and "***" in redact(text)


@pytest.mark.parametrize(
    "form",
    [
        "/services/T0AB/B0CD/XoXbSeCrEt%2Ftok%20en",  # as configured
        "/services/T0AB/B0CD/XoXbSeCrEt%2ftok%20en",  # lower-case escapes
        "/services/T0AB/B0CD/XoXbSeCrEt/tok en",  # decoded
        "/services/T0AB/B0CD/XoXbSeCrEt%252Ftok%2520en",  # encoded twice
        "%2Fservices%2FT0AB%2FB0CD%2FXoXbSeCrEt%2Ftok+en",  # form-encoded
    ],
)
def test_a_webhook_path_is_masked_in_any_encoding(form: str) -> None:
    secrets = url_secrets(WEBHOOK, path_is_secret=True)
    text = f"Max retries exceeded with url: {form} (Caused by NewConnectionError)"
    redacted = redact(text, secrets)
    assert "XoXbSeCrEt" not in redacted and "tok" not in redacted
    assert redacted.startswith("Max retries exceeded with url: ")


def test_a_query_value_of_a_webhook_is_masked() -> None:
    secrets = url_secrets(WEBHOOK, path_is_secret=True)
    assert "S1GNATURE" not in redact("signed with S1GNATURE", secrets)


def test_a_webhook_url_is_shown_by_its_host_only() -> None:
    assert redact_url(WEBHOOK, path_is_secret=True) == "https://hooks.example.com/***"
    assert redact_url("https://h.example.com", path_is_secret=True) == "https://h.example.com"


def test_a_database_url_keeps_its_user_host_and_name() -> None:
    assert redact_url("postgresql://stock:S3CRETPW@db:5432/stock") == (
        "postgresql://stock:***@db:5432/stock"
    )
    assert redact_url("postgresql://postgres@127.0.0.1:1/none") == (
        "postgresql://postgres@127.0.0.1:1/none"
    )


def test_an_unparsable_url_is_still_masked() -> None:
    assert "S3CRETPW" not in redact_url("http://u:S3CRETPW@[::1/x")


def test_one_line_escapes_every_line_break_and_control_character() -> None:
    text = "a\nb\rc\x0bd\x0ce\x1cf\x85g\u2028h\u2029i\x1b[2Jj\udcff"
    line = one_line(text)
    assert len(line.splitlines()) == 1 and line.isprintable()
    assert line.startswith("a\\x0ab")


def test_a_huge_integer_is_shown_without_failing() -> None:
    assert shown_value(10**5000) == "<an integer too long to show>"
    assert len(shown_value("x" * 10_000)) <= 200


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:PW@[::1/hooks/T0KEN",  # unparsable: an unclosed bracket
        "u:PW@hooks.example.com/hooks/T0KEN",  # no scheme
        "hooks.example.com/hooks/T0KEN",  # no scheme, no credentials
    ],
)
def test_a_malformed_webhook_url_shows_nothing_of_its_path(url: str) -> None:
    assert redact_url(url, path_is_secret=True) == "<malformed url>"


def test_the_settings_remember_their_secrets_for_every_later_message() -> None:
    variables = {
        "STOCK_SYNC_DATABASE_URL": "postgresql://stock:Pa55-Db-Word@db/stock",
        "STOCK_SYNC_ALERT_WEBHOOK_URL": "https://hooks.example.com/services/T0/B0/HookToken42",
    }
    with environment(variables):
        get_settings.cache_clear()
        try:
            get_settings()
        finally:
            get_settings.cache_clear()
    text = "auth failed with Pa55-Db-Word; POST /services/T0/B0/HookToken42 refused"
    assert redact(text) == "auth failed with ***; POST *** refused"


def test_a_password_equal_to_its_user_name_is_not_masked_everywhere() -> None:
    assert url_secrets("postgresql://stock_sync:stock_sync@postgres/stock_sync") == []

"""Log records never carry a password or a token: the JSON formatter (worker, demo, CLI) masks
every field, and the CLI prints a logged warning or error as one redacted JSON line without
traceback."""

from __future__ import annotations

import io
import json
import logging
import sys

from stock_sync.adapters.logging_setup import configure_cli_logging, json_formatter
from stock_sync.adapters.redaction import remember_secrets
from tests.support import bare_root_logger

DATABASE_URL = "postgresql://stock:S3CRETPW@db-host/stock"
WEBHOOK_TOKEN = "XOXB-WEBHOOK-TOKEN"


def record_with_secrets() -> logging.LogRecord:
    try:
        raise RuntimeError(f"cannot connect to {DATABASE_URL}")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "stock_sync.test", logging.ERROR, __file__, 1, "failed at %s", (DATABASE_URL,), exc_info
    )
    record.context = {"webhook": f"https://hooks.example.com/x%2F{WEBHOOK_TOKEN}", "n": 1}
    record.error_message = f"POST /x/{WEBHOOK_TOKEN} refused"
    return record


def test_the_json_formatter_masks_every_field() -> None:
    remember_secrets([f"/x/{WEBHOOK_TOKEN}"])  # as get_settings() does for the webhook URL

    line = json_formatter().format(record_with_secrets())

    assert "S3CRETPW" not in line and WEBHOOK_TOKEN not in line
    fields = json.loads(line)
    assert fields["message"] == "failed at postgresql://stock:***@db-host/stock"
    assert fields["context"]["n"] == 1 and "RuntimeError" in fields["exc_info"]


def test_the_cli_prints_a_logged_error_as_one_redacted_json_line_without_traceback() -> None:
    line = json_formatter(with_traceback=False).format(record_with_secrets())

    assert "\n" not in line and "Traceback" not in line and "S3CRETPW" not in line
    fields = json.loads(line)
    assert (fields["level"], fields["message"]) == (
        "ERROR",
        "failed at postgresql://stock:***@db-host/stock",
    )
    assert (
        fields["exc_info"] == "RuntimeError: cannot connect to postgresql://stock:***@db-host/stock"
    )


def test_cli_logging_leaves_a_configured_root_logger_alone() -> None:
    with bare_root_logger() as root:
        stream = io.StringIO()
        configure_cli_logging(stream)
        (installed,) = root.handlers
        configure_cli_logging(io.StringIO())  # a second call adds nothing
        assert root.handlers == [installed]
        logger = logging.getLogger("stock_sync.test")
        logger.info("below the CLI's level: not shown")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.error("lost %s", DATABASE_URL, exc_info=True)
        (line,) = stream.getvalue().splitlines()
        fields = json.loads(line)
        assert fields["message"] == "lost postgresql://stock:***@db-host/stock"
        assert fields["exc_info"] == "RuntimeError: boom"

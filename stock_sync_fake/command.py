"""The fake's command, added to ``stock-sync`` as the plugin command ``fake-microservice`` (the
entry point group ``stock_sync.commands`` in pyproject.toml; the runtime command line does not
import the fake) and run by ``python -m stock_sync_fake``."""

from __future__ import annotations

import contextlib

import click

from stock_sync.entrypoints.cli_params import PLAIN_TEXT, FiniteFloatRange
from stock_sync_fake import DEFAULT_STRICT, serve


@click.command("fake-microservice")
@click.option("--host", type=PLAIN_TEXT, default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--orders", "orders_file", type=click.Path(dir_okay=False), default=None)
@click.option("--error-rate", type=FiniteFloatRange(0, 1), default=0.0, show_default=True)
@click.option("--latency", "latency_s", type=FiniteFloatRange(0), default=0.0, show_default=True)
@click.option("--rate-limit-rate", type=FiniteFloatRange(0, 1), default=0.0, show_default=True)
@click.option("--timeout-rate", type=FiniteFloatRange(0, 1), default=0.0, show_default=True)
@click.option(
    "--revision-form",
    type=click.Choice(["string", "integer"]),
    default="string",
    show_default=True,
    help="Serve revisions as Allegro does (opaque strings) or as integers.",
)
@click.option(
    "--strict/--lenient",
    default=DEFAULT_STRICT,
    show_default=True,
    help="Behave as Allegro does (revisions move only on changes, Idempotency-Keys bound to "
    "their first request) or the kinder way.",
)
def fake_microservice(
    host: str,
    port: int,
    orders_file: str | None,
    error_rate: float,
    latency_s: float,
    rate_limit_rate: float,
    timeout_rate: float,
    revision_form: str,
    strict: bool,
) -> None:
    """Serve the microservice contract from orders held in memory (tests, demo, benchmarks)."""
    faults = {
        "error_rate": error_rate,
        "latency_s": latency_s,
        "rate_limit_rate": rate_limit_rate,
        "timeout_rate": timeout_rate,
    }
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the way to stop it
        serve(
            host=host,
            port=port,
            orders_file=orders_file,
            faults=faults,
            revision_form=revision_form,  # type: ignore[arg-type]  # click.Choice checked it
            strict=strict,
        )

"""The fake Allegro microservice: the contract of DESIGN.md served from memory over real HTTP,
with fault knobs and an admin API (tests, the demo, the benchmark, compose's
``fake-microservice`` service).

Its own package beside the runtime: ``stock_sync`` never imports it. It speaks the contract
with the client's own models and revision type (``stock_sync.adapters``), so the two cannot
drift apart. The public API is what this module exports; ``server`` holds the rest.

    fake = FakeMicroservice(strict=True)   # port 0: any free port
    fake.start(); fake.add_order({...}); fake.url
    python -m stock_sync_fake --port 8765  # or `stock-sync fake-microservice`
"""

from stock_sync_fake.server import (
    DEFAULT_STRICT,
    FAULT_KNOBS,
    FULFILLMENT_STATUSES,
    ORDER_KNOBS,
    ORDER_STATUSES,
    FakeMicroservice,
    load_orders_file,
    serve,
)

__all__ = [
    "DEFAULT_STRICT",
    "FAULT_KNOBS",
    "FULFILLMENT_STATUSES",
    "ORDER_KNOBS",
    "ORDER_STATUSES",
    "FakeMicroservice",
    "load_orders_file",
    "serve",
]

"""The fake Allegro microservice: the contract of DESIGN.md served from memory over real HTTP,
with fault knobs and an admin API (tests, the demo, the benchmark, compose's
``fake-microservice`` service).

Its own package beside the runtime: ``stock_sync`` never imports it. It speaks the contract
with the client's own statuses, revision rules and error bodies
(``stock_sync.adapters.marketplace_contract``) and the domain's ``Revision``, so the two cannot
drift apart. The public API is what this module exports. Inside: ``server`` (the
``FakeMicroservice`` facade and ``serve``; its docstring describes the fake's behaviour),
``state`` (orders, faults, keys and what a request does to them), ``orders`` (checking what the
fake is given), ``replies`` (answers and their encoding), ``http_server`` (server and routes).

    fake = FakeMicroservice(strict=True)   # port 0: any free port
    fake.start(); fake.add_order({...}); fake.url
    python -m stock_sync_fake --port 8765  # or `stock-sync fake-microservice`
"""

from stock_sync.adapters.marketplace_contract import FULFILLMENT_STATUSES, ORDER_STATUSES
from stock_sync_fake.orders import FAULT_KNOBS, ORDER_KNOBS, load_orders_file
from stock_sync_fake.server import FakeMicroservice, serve
from stock_sync_fake.state import DEFAULT_STRICT

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

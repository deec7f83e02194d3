"""The orders and the stock of a fault-suite run (``python -m stock_sync_dev.chaos``), drawn
from a seed so a run can be repeated.

- SKUs: a few hot ones shared by many orders, a pool of ordinary ones and two scarce ones.
  Names mix lower and upper case on purpose ("apple-1", "Zebra-1"): Python sorts "Zebra-1"
  before "apple-1", an en-US collation sorts it after, so code that takes stock locks in one
  order here and in the database's order there can deadlock. The two are a bundle, bought
  together by 30% of the orders.
- Orders: 1-3 lines of 1-3 units. Every SKU is stocked with what its orders ask plus a margin,
  except the scarce SKUs (half of what is asked), so some orders run short; a few greedy
  orders ask far more than exists. Both end FAILED once their validation budget is spent.
- Per-order faults of the fake microservice: orders paid late, sync PUTs whose answer is lost
  after they took effect (502 or a dropped connection), and PUTs held at a gate that land
  after their sender gave up.
- Submits: many orders are submitted from two or three threads at once, one without an account
  name and one with it, as a shop backend racing itself would.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ACCOUNT = "shop"
# Mixed case on purpose: Python's order and an en-US collation's order disagree on them.
HOT_SKUS = ("apple-1", "Zebra-1", "banana-2", "Yak-2", "cherry-3", "Xylo-3")
BUNDLE = ("apple-1", "Zebra-1")  # often bought together
BUNDLE_SHARE = 0.3
SCARCE_SKUS = ("kiwi-9", "Quince-9")
ORDINARY_SKU_WORDS = ("mango", "Lemon", "olive", "Nectar", "pear", "Kale", "fig", "Juniper")
ORDERS_PER_ORDINARY_SKU = 40
MIN_ORDINARY_SKUS = 8

HOT_LINE_SHARE = 0.45
SCARCE_LINE_SHARE = 0.04
LINES_PER_ORDER = (1, 1, 2, 2, 3)
MAX_UNITS_PER_LINE = 3
STOCK_MARGIN = 0.1  # an ordinary SKU holds what its orders ask, plus this share
SCARCE_STOCK_SHARE = 0.5  # a scarce SKU holds this share of what its orders ask
ORDERS_PER_GREEDY_ORDER = 250
GREEDY_FACTOR = 10  # a greedy order asks this many times what the SKU will ever hold

PAID_LATE_SHARE = 0.03  # GET shows BOUGHT twice first: the operation waits in PENDING
ANSWER_LOST_502_SHARE = 0.02  # first sync PUT applied, answered 502
ANSWER_DROPPED_SHARE = 0.02  # first sync PUT applied, connection closed without an answer
HELD_PUT_SHARE = 0.02  # sync PUTs wait at a gate and land late, after their sender gave up

RACED_SUBMIT_SHARE = 0.1  # submitted from two threads at once (None vs the account name)
THIRD_RACER_SHARE = 0.3  # of the raced ones, a third thread joins
UNNAMED_SINGLE_SUBMIT_SHARE = 0.3  # single submits without the account name


@dataclass(frozen=True)
class Line:
    sku: str
    quantity: int


@dataclass(frozen=True)
class PlannedOrder:
    """An order as the fake microservice serves it, and how the run submits it."""

    order_id: str
    lines: tuple[Line, ...]
    # The account names of the concurrent submits: one entry per submitting thread.
    submit_accounts: tuple[str | None, ...]
    knobs: Mapping[str, Any] = field(default_factory=dict)
    greedy: bool = False

    @property
    def may_run_short(self) -> bool:
        """Whether the order can legitimately end FAILED: it is greedy or wants a scarce SKU."""
        return self.greedy or any(line.sku in SCARCE_SKUS for line in self.lines)

    @property
    def held(self) -> bool:
        return bool(self.knobs.get("hold_puts"))

    def body(self) -> dict[str, Any]:
        """The order body for ``FakeMicroservice.add_order`` (knobs passed separately)."""
        return {
            "id": self.order_id,
            "account_name": ACCOUNT,
            "status": "READY_FOR_PROCESSING",
            "fulfillment_status": "NEW",
            "line_items": [
                {"id": f"{self.order_id}-{index}", "sku": line.sku, "quantity": line.quantity}
                for index, line in enumerate(self.lines, start=1)
            ],
        }


@dataclass(frozen=True)
class Scenario:
    orders: tuple[PlannedOrder, ...]
    initial_stock: Mapping[str, int]

    def short_order_ids(self) -> frozenset[str]:
        """The orders that may legitimately end FAILED (see ``PlannedOrder.may_run_short``)."""
        return frozenset(order.order_id for order in self.orders if order.may_run_short)


def ordinary_skus(order_count: int) -> list[str]:
    count = max(MIN_ORDINARY_SKUS, order_count // ORDERS_PER_ORDINARY_SKU)
    words = ORDINARY_SKU_WORDS
    return [f"{words[i % len(words)]}-{10 + i // len(words)}" for i in range(count)]


def _pick_skus(rng: random.Random, ordinary: list[str]) -> list[str]:
    """1-3 distinct SKUs: the bundle in a quarter of the orders, hot ones often, scarce ones
    seldom, ordinary ones otherwise."""
    wanted = rng.choice(LINES_PER_ORDER)
    picked: list[str] = []
    if rng.random() < BUNDLE_SHARE:
        picked = list(BUNDLE)
        wanted = max(wanted, len(BUNDLE))
    while len(picked) < wanted:
        draw = rng.random()
        if draw < SCARCE_LINE_SHARE:
            sku = rng.choice(SCARCE_SKUS)
        elif draw < SCARCE_LINE_SHARE + HOT_LINE_SHARE:
            sku = rng.choice(HOT_SKUS)
        else:
            sku = rng.choice(ordinary)
        if sku not in picked:
            picked.append(sku)
    return picked


def _knobs(rng: random.Random) -> dict[str, Any]:
    """At most one per-order fault of the fake, with the shares above."""
    draw = rng.random()
    thresholds = (
        (PAID_LATE_SHARE, {"ready_after_reads": 2}),
        (ANSWER_LOST_502_SHARE, {"fail_puts_after_apply": 1}),
        (ANSWER_DROPPED_SHARE, {"drop_puts_after_apply": 1}),
        (HELD_PUT_SHARE, {"hold_puts": 1}),
    )
    for share, knobs in thresholds:
        if draw < share:
            return knobs
        draw -= share
    return {}


def _submit_accounts(rng: random.Random) -> tuple[str | None, ...]:
    if rng.random() < RACED_SUBMIT_SHARE:
        racers: list[str | None] = [None, ACCOUNT]
        if rng.random() < THIRD_RACER_SHARE:
            racers.append(rng.choice((None, ACCOUNT)))
        rng.shuffle(racers)
        return tuple(racers)
    return (None,) if rng.random() < UNNAMED_SINGLE_SUBMIT_SHARE else (ACCOUNT,)


def _ordinary_order(rng: random.Random, order_id: str, ordinary: list[str]) -> PlannedOrder:
    lines = tuple(
        Line(sku, rng.randint(1, MAX_UNITS_PER_LINE)) for sku in _pick_skus(rng, ordinary)
    )
    return PlannedOrder(order_id, lines, _submit_accounts(rng), _knobs(rng))


def stock_for(orders: list[PlannedOrder], skus: list[str]) -> dict[str, int]:
    """What each SKU is stocked with: its demand plus a margin, scarce ones half of it."""
    demand: Counter[str] = Counter()
    for order in orders:
        for line in order.lines:
            demand[line.sku] += line.quantity
    stock = {}
    for sku in skus:
        asked = demand[sku]
        if sku in SCARCE_SKUS:
            stock[sku] = int(asked * SCARCE_STOCK_SHARE)
        else:
            stock[sku] = asked + max(2, int(asked * STOCK_MARGIN))
    return stock


def build_scenario(order_count: int, seed: int, run_tag: str) -> Scenario:
    """``order_count`` orders (ids carry ``run_tag``) and the stock they start from."""
    rng = random.Random(seed)
    ordinary = ordinary_skus(order_count)
    order_ids = [f"chaos-{run_tag}-{index:05d}" for index in range(order_count)]
    greedy_count = min(order_count, max(2, order_count // ORDERS_PER_GREEDY_ORDER))
    greedy_ids = set(rng.sample(order_ids, greedy_count))
    regular = [
        _ordinary_order(rng, order_id, ordinary)
        for order_id in order_ids
        if order_id not in greedy_ids
    ]
    stock = stock_for(regular, [*HOT_SKUS, *SCARCE_SKUS, *ordinary])
    by_id = {order.order_id: order for order in regular}
    for order_id in sorted(greedy_ids):
        sku = rng.choice(HOT_SKUS)
        by_id[order_id] = PlannedOrder(
            order_id,
            (Line(sku, GREEDY_FACTOR * max(stock[sku], 1)),),
            _submit_accounts(rng),
            greedy=True,
        )
    return Scenario(tuple(by_id[order_id] for order_id in order_ids), stock)

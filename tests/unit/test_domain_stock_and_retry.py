"""Pure stock math and backoff arithmetic: no server involved."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stock_sync.domain.errors import InsufficientStock, InvalidInput, StockShortage, UnknownSku
from stock_sync.domain.retry_policy import RetryPolicy, compute_backoff
from stock_sync.domain.stock import (
    LineItem,
    in_lock_order,
    required_quantities,
    validate_stock_levels,
)


def line(line_id: str, sku: str, quantity: int) -> LineItem:
    return LineItem(id=line_id, offer_id=f"offer-{line_id}", sku=sku, quantity=quantity)


def test_lines_sharing_a_sku_are_summed_in_sku_order() -> None:
    lines = [line("1", "B", 2), line("2", "A", 1), line("3", "B", 3)]
    assert list(required_quantities(lines).items()) == [("A", 1), ("B", 5)]
    assert [item.id for item in in_lock_order(lines)] == ["2", "1", "3"]


def test_validation_passes_when_every_sku_has_enough() -> None:
    result = validate_stock_levels([line("1", "A", 2)], {"A": 2})
    assert result.ok


def test_validation_lists_each_short_line_with_requested_and_available() -> None:
    result = validate_stock_levels(
        [line("1", "A", 2), line("2", "B", 5), line("3", "B", 1)], {"A": 1, "B": 9}
    )
    assert not result.ok
    assert result.shortages == (StockShortage(sku="A", requested=2, available=1),)
    error = result.to_error()
    assert isinstance(error, InsufficientStock)
    assert "A (requested 2, available 1)" in str(error)


def test_unknown_skus_are_reported_first() -> None:
    result = validate_stock_levels([line("1", "A", 1), line("2", "ZZ", 1)], {"A": 0})
    assert result.unknown_skus == ("ZZ",)
    assert isinstance(result.to_error(), UnknownSku)


@pytest.mark.parametrize(("sku", "quantity"), [("", 1), ("A", 0), ("A", -2)])
def test_a_malformed_line_is_refused_naming_the_problem(sku: str, quantity: int) -> None:
    with pytest.raises(InvalidInput, match="line item"):
        line("9", sku, quantity)


@given(
    lines=st.lists(
        st.tuples(st.sampled_from("ABC"), st.integers(min_value=1, max_value=20)), max_size=8
    ),
    levels=st.dictionaries(st.sampled_from("ABC"), st.integers(min_value=0, max_value=50)),
)
def test_validation_agrees_with_a_plain_recount(
    lines: list[tuple[str, int]], levels: dict[str, int]
) -> None:
    items = [line(str(i), sku, qty) for i, (sku, qty) in enumerate(lines)]
    result = validate_stock_levels(items, levels)
    wanted: dict[str, int] = {}
    for sku, qty in lines:
        wanted[sku] = wanted.get(sku, 0) + qty
    servable = all(sku in levels and levels[sku] >= qty for sku, qty in wanted.items())
    assert result.ok == servable


def test_backoff_doubles_until_the_cap_without_jitter() -> None:
    delays = [compute_backoff(n, base_s=0.5, max_s=3.0, jitter=False) for n in range(1, 6)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_backoff_keeps_fractional_bases() -> None:
    assert compute_backoff(1, base_s=0.05, max_s=1.0, jitter=False) == pytest.approx(0.05)


@given(
    retries=st.integers(min_value=1, max_value=200),
    base=st.floats(min_value=0.01, max_value=10),
    spread=st.floats(min_value=1, max_value=1000),
    draw=st.floats(min_value=0, max_value=1),
)
def test_jittered_backoff_stays_within_half_and_full_delay(
    retries: int, base: float, spread: float, draw: float
) -> None:
    cap = base * spread
    full = compute_backoff(retries, base_s=base, max_s=cap, jitter=False)
    jittered = compute_backoff(retries, base_s=base, max_s=cap, rand=lambda: draw)
    assert full / 2 <= jittered <= full <= cap


def test_retry_after_from_the_server_lengthens_the_wait_up_to_the_cap() -> None:
    policy = RetryPolicy(max_retries=3, base_s=0.1, max_s=5.0)
    assert policy.delay_for(1, at_least_s=2.0, jitter=False) == 2.0
    assert policy.delay_for(1, at_least_s=60.0, jitter=False) == 5.0


def test_a_policy_is_exhausted_after_its_retries() -> None:
    policy = RetryPolicy(max_retries=2, base_s=0.1, max_s=1.0)
    assert not policy.exhausted(1)
    assert policy.exhausted(2)


def test_backoff_refuses_a_zero_retry_number() -> None:
    with pytest.raises(ValueError, match="retries must be >= 1"):
        compute_backoff(0, base_s=1, max_s=2)

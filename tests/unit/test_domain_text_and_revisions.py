"""Unit tests of the free-text check and the opaque revision (no server)."""

from __future__ import annotations

import pytest

from stock_sync.domain.errors import InvalidInput
from stock_sync.domain.revisions import (
    revision_from_text,
    revision_to_text,
    same_revision,
)
from stock_sync.domain.text import checked_text


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (7, "must be a string, got int"),
        (None, "must be a string, got NoneType"),
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("a\x00b", "U+0000"),
        ("a\ud800b", "U+D800"),
        ("two\nlines", "U+000A"),
        ("\x1b[31mred", "U+001B"),
        ("\u202eevil", "U+202E"),
        ("x" * 11, "longer than 10 characters (11)"),
    ],
)
def test_checked_text_refuses_naming_the_argument_and_the_problem(
    value: object, problem: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        checked_text("reason", value, max_length=10)
    message = str(refused.value)
    assert message.startswith("reason ") and problem in message and "\n" not in message


def test_checked_text_keeps_printable_unicode_and_strips_the_ends() -> None:
    assert checked_text("reason", "  zwrot 🙂 Łódź  ", max_length=20) == "zwrot 🙂 Łódź"


def test_checked_text_can_refuse_inner_whitespace() -> None:
    with pytest.raises(InvalidInput, match="order_id must not contain whitespace"):
        checked_text("order_id", "a b", max_length=10, allow_spaces=False)


@pytest.mark.parametrize("revision", ["d8e8fca2", 7, "7", "", -1])
def test_a_revision_comes_back_with_its_type(revision: str | int) -> None:
    back = revision_from_text(revision_to_text(revision))
    assert back == revision and type(back) is type(revision)


def test_a_string_revision_is_not_the_integer_with_the_same_digits() -> None:
    assert not same_revision("7", 7) and same_revision("7", "7") and same_revision(7, 7)


@pytest.mark.parametrize("revision", [True, 1.5, None, ["a"]])
def test_a_revision_must_be_a_string_or_an_integer(revision: object) -> None:
    with pytest.raises(InvalidInput, match="revision must be a string or an integer"):
        revision_to_text(revision)  # type: ignore[arg-type]

"""Property: whatever the STOCK_SYNC_* environment holds, load_settings() either returns settings
within the documented bounds or raises ConfigurationError with one line naming a variable that
was set, never quoting a password; never any other exception."""

from __future__ import annotations

import re
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from stock_sync.adapters.settings import load_settings
from stock_sync.domain.errors import ConfigurationError
from tests.settings_support import DOCUMENTED_BOUNDS, environment, out_of_bounds

VARIABLES = sorted(DOCUMENTED_BOUNDS)
PASSWORD_MARK = "PWMARK"

# What an environment can hold: any character but NUL, including the lone surrogates Python
# decodes undecodable bytes to (os.environ uses surrogateescape).
env_characters = st.one_of(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
)
any_text = st.text(env_characters, max_size=40)
FIELD_CASES = [
    *("inf", "-inf", "nan", "NaN", "Infinity", "1e300", "1e-300", "10^30", "1" + "0" * 30),
    *("", " ", "0", "-0", "1_000", "0x10", "1.5", " 7 ", "true", "9" * 5000),
]
number_like = st.one_of(
    st.integers().map(str),
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.floats().map(repr),
    st.floats(min_value=-1e7, max_value=1e7).map(str),
    st.sampled_from(FIELD_CASES),
)
passwords = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="@/?#%"),
    max_size=12,
).map(lambda tail: PASSWORD_MARK + tail)
url_like = st.builds(
    "{}://{}:{}@{}{}".format,
    st.sampled_from(["postgresql", "postgres", "sqlite", "mysql", "redis", "http", "https", "x"]),
    st.sampled_from(["u", "", "stock_sync"]),
    passwords,
    st.sampled_from(["db-host", "h:xx", "[::1", "h:5432", ""]),
    st.sampled_from(["", "/db", "/hooks/TOKENMARK123", "/x?token=TOKENMARK123", "/a b"]),
)
# A token in the path is a secret only in the webhook's URL; in a query it always is.
values = st.one_of(any_text, number_like, url_like)


def passwords_in(texts: Iterable[str]) -> list[str]:
    """The passwords of the generated URLs among ``texts`` (user:PASSWORD@)."""
    return [m for text in texts for m in re.findall(rf"://[^:/]*:({PASSWORD_MARK}[^@]*)@", text)]


def check(variables: dict[str, str]) -> None:
    with environment(variables):
        try:
            loaded = load_settings()
        except ConfigurationError as error:
            message = str(error)
            assert message.startswith("invalid configuration: STOCK_SYNC_"), message
            assert len(message.splitlines()) == 1 and "\n" not in message, message
            assert any(variable in message for variable in variables), message
            for password in passwords_in(variables.values()):
                assert password not in message, message
            if "STOCK_SYNC_ALERT_WEBHOOK_URL" in message:  # its path is its secret
                assert "TOKENMARK123" not in message, message
            return
    assert out_of_bounds(loaded) == [], variables


@settings(deadline=None)
@given(variable=st.sampled_from(VARIABLES), value=values)
def test_any_value_of_any_one_variable(variable: str, value: str) -> None:
    check({variable: value})


@settings(deadline=None)
@given(variable=st.sampled_from(VARIABLES), value=number_like)
def test_any_number_for_any_one_variable(variable: str, value: str) -> None:
    check({variable: value})


@settings(deadline=None)
@given(variables=st.dictionaries(st.sampled_from(VARIABLES), values, min_size=2, max_size=12))
def test_any_combination_of_variables(variables: dict[str, str]) -> None:
    check(variables)

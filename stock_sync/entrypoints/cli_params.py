"""Click parameter types that refuse hostile input before a command runs (nothing written)."""

from __future__ import annotations

import math
import re
import unicodedata
from typing import TYPE_CHECKING, Any

import click

from stock_sync.adapters.redaction import shown_value
from stock_sync.adapters.stock_ledger import MAX_STOCK_QUANTITY
from stock_sync.domain.durations import parse_duration
from stock_sync.domain.errors import InvalidInput

if TYPE_CHECKING:  # click 8.2 made ParamType generic; 8.1, which pyproject allows, is not
    _IntParamType = click.ParamType[int]
    _TextParamType = click.ParamType[str]
    _FloatParamType = click.ParamType[float]
else:
    _IntParamType = _TextParamType = _FloatParamType = click.ParamType

_WHOLE_NUMBER = re.compile(r"\s*(?P<sign>[+-]?)(?P<digits>[0-9]+)\s*")
# Characters that would break a one-line message or cannot be stored as text: control
# characters, line and paragraph separators, and the surrogates Python decodes undecodable
# command-line bytes to.
_UNSAFE_CATEGORIES = ("Cc", "Cs", "Zl", "Zp")


class Quantity(_IntParamType):
    """A stock quantity: a whole number from 0 to MAX_STOCK_QUANTITY (a 4-byte INTEGER)."""

    name = "quantity"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return self._bounded(value, value)
        match = _WHOLE_NUMBER.fullmatch(str(value))
        if match is None:
            self.fail(f"quantity must be a whole number, got {shown_value(value)}", param, ctx)
        digits = match["digits"].lstrip("0") or "0"
        if len(digits) > len(str(MAX_STOCK_QUANTITY)):  # int() of 5,000 digits is refused
            self.fail(
                f"quantity must be <= {MAX_STOCK_QUANTITY}, got {shown_value(value)}", param, ctx
            )
        number = -int(digits) if match["sign"] == "-" else int(digits)
        return self._bounded(number, value, param, ctx)

    def _bounded(
        self,
        number: int,
        given: Any,
        param: click.Parameter | None = None,
        ctx: click.Context | None = None,
    ) -> int:
        if number < 0:
            self.fail(f"quantity must be >= 0, got {shown_value(given)}", param, ctx)
        if number > MAX_STOCK_QUANTITY:
            self.fail(
                f"quantity must be <= {MAX_STOCK_QUANTITY}, got {shown_value(given)}", param, ctx
            )
        return number


class PlainText(_TextParamType):
    """Text without control characters or undecodable bytes (stored, echoed on one line)."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        for position, char in enumerate(text):
            if unicodedata.category(char) in _UNSAFE_CATEGORIES:
                self.fail(
                    f"must not contain control characters or undecodable bytes "
                    f"(found {char!r} at position {position})",
                    param,
                    ctx,
                )
        return text


QUANTITY = Quantity()
PLAIN_TEXT = PlainText()


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (which pass every comparison check)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"must be a finite number, got {shown_value(value)}", param, ctx)
        return number


class Duration(_FloatParamType):
    """A duration as operators type it (``90s``, ``15m``, ``2h``, ``7d``), in seconds."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value))
        except InvalidInput as error:
            self.fail(str(error), param, ctx)


DURATION = Duration()

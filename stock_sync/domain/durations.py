"""Durations as operators type them: ``90s``, ``15m``, ``2h``, ``7d``, ``1h30m``, or seconds."""

from __future__ import annotations

import re

from stock_sync.domain.errors import InvalidInput

MAX_DURATION_S = 366 * 24 * 3600.0
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(text: str) -> float:
    """Seconds in ``text``; InvalidInput naming the problem for anything else.

    A bare number is seconds; otherwise one or more ``<number><unit>`` parts, largest unit
    first is not required (``1h30m`` and ``30m1h`` are both 5,400 s). Positive, at most a
    year."""
    cleaned = text.strip().lower()
    if not cleaned:
        raise InvalidInput("duration is empty (e.g. 90s, 15m, 2h, 7d)")
    try:
        seconds = float(cleaned)
    except ValueError:
        parts = _PART.findall(cleaned)
        if not parts or "".join(number + unit for number, unit in parts) != cleaned:
            raise InvalidInput(f"not a duration: {text!r} (e.g. 90s, 15m, 2h, 7d, 1h30m)") from None
        seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    if not 0 < seconds <= MAX_DURATION_S:  # also refuses nan and inf
        raise InvalidInput(f"duration must be more than 0 and at most 366d, got {text!r}")
    return seconds

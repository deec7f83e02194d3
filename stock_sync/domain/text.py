"""Free text from callers (producer, cancellation, CLI): checked once, the same way everywhere.

Text ends up in database rows, JSON logs and terminals. NUL and lone surrogates break the
database driver; newlines, escape sequences and bidirectional controls printed later rewrite
what an operator sees. They are refused, not cleaned, so nothing half-written is stored.
"""

from __future__ import annotations

import unicodedata

from stock_sync.domain.errors import InvalidInput

# Unicode categories refused anywhere: control characters (C0, C1, DEL) and lone surrogates.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs"})
# Format characters that reorder what a terminal shows (the "trojan source" controls).
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def first_unsafe_character(value: str) -> str | None:
    """The first character that must not be stored or printed, or None."""
    for character in value:
        if unicodedata.category(character) in _REFUSED_CATEGORIES or character in _BIDI_CONTROLS:
            return character
    return None


def checked_text(
    name: str,
    value: object,
    *,
    max_length: int,
    allow_spaces: bool = True,
) -> str:
    """``value`` stripped, or InvalidInput naming ``name`` and what is wrong with it.

    Refused: anything but a string, an empty or blank string, more than ``max_length``
    characters, a control character, a lone surrogate, a bidirectional control, and, with
    ``allow_spaces=False``, any whitespace inside.
    """
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string, got {type(value).__name__}")
    unsafe = first_unsafe_character(value)
    if unsafe is not None:
        raise InvalidInput(
            f"{name} must not contain control characters, lone surrogates or bidirectional "
            f"controls (found U+{ord(unsafe):04X})"
        )
    cleaned = value.strip()
    if not cleaned:
        raise InvalidInput(f"{name} must not be empty")
    if len(cleaned) > max_length:
        raise InvalidInput(f"{name} is longer than {max_length} characters ({len(cleaned)})")
    if not allow_spaces and any(character.isspace() for character in cleaned):
        raise InvalidInput(f"{name} must not contain whitespace")
    return cleaned

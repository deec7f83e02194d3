"""The order revision: an opaque token, compared only for equality and echoed back unchanged.

Allegro sends a string (``"d8e8fca2"``); some deployments of the wrapper send an integer. The
row keeps it as text, as its JSON encoding, so the type comes back too: the string ``"7"`` and
the integer ``7`` are different revisions and each is echoed the way it arrived.
"""

from __future__ import annotations

import json

from stock_sync.domain.errors import InvalidInput

Revision = str | int


def revision_to_text(revision: Revision) -> str:
    """The text stored on the row for ``revision``."""
    if isinstance(revision, bool) or not isinstance(revision, str | int):
        raise InvalidInput(f"revision must be a string or an integer, got {revision!r}")
    return json.dumps(revision)


def revision_from_text(text: str) -> Revision:
    """The revision stored as ``text`` by :func:`revision_to_text`, with its type."""
    try:
        revision = json.loads(text)
    except ValueError:
        raise InvalidInput(f"stored revision is not a JSON string or integer: {text!r}") from None
    if isinstance(revision, bool) or not isinstance(revision, str | int):
        raise InvalidInput(f"stored revision is not a JSON string or integer: {text!r}")
    return revision


def same_revision(left: Revision, right: Revision) -> bool:
    """Equality of the token, type included: the string ``"7"`` is not the integer ``7``."""
    return type(left) is type(right) and left == right

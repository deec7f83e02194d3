"""What may be shown: every message and log record passes through here on its way out.

One helper for every surface (settings errors, database errors, CLI errors, alert webhook
errors, log records), so a password or a token cannot leak through one that forgot:

- :func:`redact` masks, in any text, the credentials of URLs (``scheme://user:PASSWORD@``),
  the values of query parameters whose name says they are secret (``?token=…``), and every
  secret this process knows about (:func:`remember_secrets`; the settings register theirs),
  whether it appears as given, percent-decoded or percent-encoded (``%2F`` or ``%2f``, once
  or twice), because libraries quote URLs their own way in their error messages;
- :func:`redact_url` shows a configured URL: password masked, and for URLs whose path is a
  secret (webhooks) only where it points;
- :func:`one_line` makes user-controlled text safe for a one-line error: control characters
  and line separators escaped, long values cut.

Plain Python on purpose: settings, db, logging and the CLI all import it.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

MASK = "***"
MALFORMED_URL = "<malformed url>"
# Shorter secrets are only masked where they sit in a URL: masking every "ab" in every message
# would mangle the messages without protecting anything a guess could not find.
MIN_FREE_SECRET_CHARS = 4
MAX_SHOWN_CHARS = 200

_SECRET_WORDS = "token|key|secret|password|passwd|pwd|signature|sig|auth|credential|session"
# scheme://user:password@ (the scheme may be missing or mangled); the password runs to the
# last "@" before whitespace, so an unescaped "@" or quote inside it is masked too
# (over-masking the rest of a URL is the safe side).
_URL_CREDENTIALS = re.compile(
    r"(?P<prefix>(?:\b[A-Za-z][A-Za-z0-9+.\-]*)?://[^\s:/?#@'\"]*:)(?P<password>\S*)@"
)
_SECRET_QUERY_VALUE = re.compile(
    rf"(?P<name>[?&;][\w.\-]*(?:{_SECRET_WORDS})[\w.\-]*=)(?P<value>[^&#\s'\"]*)",
    re.IGNORECASE,
)

_known_secrets: frozenset[str] = frozenset()
_known_secrets_lock = threading.Lock()


def remember_secrets(secrets: Iterable[str]) -> None:
    """Mask these values in everything :func:`redact` sees from now on (process-wide)."""
    global _known_secrets
    fresh = {secret for secret in secrets if _worth_masking(secret)}
    with _known_secrets_lock:
        _known_secrets = _known_secrets | fresh


def _worth_masking(secret: str) -> bool:
    return len(_fully_unquoted(secret)) >= MIN_FREE_SECRET_CHARS


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL passwords, secret query values and known secrets replaced by ***."""
    for secret in sorted({*_known_secrets, *filter(_worth_masking, secrets)}, key=len)[::-1]:
        text = _secret_pattern(secret).sub(MASK, text)
    text = _URL_CREDENTIALS.sub(lambda match: f"{match['prefix']}{MASK}@", text)
    return _SECRET_QUERY_VALUE.sub(lambda match: f"{match['name']}{MASK}", text)


def redact_url(url: str, *, path_is_secret: bool = False) -> str:
    """A URL fit to print: its password masked; with ``path_is_secret`` (webhooks carry their
    token in the path or query) only its scheme, host and port."""
    if path_is_secret:
        return _where_it_points(url)
    if "://" not in url and "@" in url:
        return redact(_without_schemeless_password(url))
    return redact(url, url_secrets(url))


def _where_it_points(url: str) -> str:
    """``scheme://host:port/***``; anything we cannot parse is shown as nothing at all, since
    where its host ends and its secret starts is then a guess."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return MALFORMED_URL
    if "://" not in url or not parts.hostname:
        return MALFORMED_URL
    hidden = f"/{MASK}" if (parts.path.strip("/") or parts.query or parts.fragment) else ""
    return redact(f"{parts.scheme}://{_host_and_port(parts)}{hidden}")


def _without_schemeless_password(url: str) -> str:
    """``user:password@host/db`` (a URL missing its scheme) with the password masked."""
    userinfo, _, rest = url.rpartition("@")
    user, separator, _ = userinfo.partition(":")
    return f"{user}:{MASK}@{rest}" if separator else url


def _host_and_port(parts: SplitResult) -> str:
    # parts.port raises on a port that is not a number: show the text after the credentials.
    return parts.netloc.rpartition("@")[2]


def url_secrets(url: str, *, path_is_secret: bool = False) -> list[str]:
    """The secret parts of ``url``: its password, the values of secret-named query parameters,
    and with ``path_is_secret`` its whole path and query and each long segment of them."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return []
    # A password equal to its user name (compose's stock_sync:stock_sync) is shown with the
    # user name anyway; masking that word everywhere would only mangle queue and table names.
    found = [password] if password and password != parts.username else []
    query = parse_qsl(parts.query, keep_blank_values=True)
    found += [value for name, value in query if re.search(_SECRET_WORDS, name, re.IGNORECASE)]
    if path_is_secret:
        tail = f"{parts.path}?{parts.query}" if parts.query else parts.path
        found += [tail, parts.path, parts.query, *(value for _, value in query)]
        found += [segment for segment in parts.path.split("/") if len(segment) >= 8]
    return [secret for secret in found if secret and secret.strip("/")]


def redact_data(value: Any) -> Any:
    """``value`` (JSON-like data: dicts, lists, strings...) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_data(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_data(item) for item in value]
    return value


def printable_lines(text: str) -> str:
    """Multi-line output for a terminal: each line redacted and escaped like :func:`one_line`
    (no escape sequence or carriage return from stored data reaches the terminal), uncut."""
    return "\n".join(one_line(redact(line), max_chars=None) for line in text.split("\n"))


# --- matching a secret in any percent-encoding ------------------------------------------------


def _fully_unquoted(text: str) -> str:
    """Percent-decode until nothing changes (a URL may arrive encoded twice)."""
    for _ in range(3):
        decoded = unquote(text, errors="surrogateescape")
        if decoded == text:
            break
        text = decoded
    return text


def _utf8(char: str) -> bytes:
    try:
        return char.encode("utf-8", "surrogateescape")  # bytes that were not UTF-8
    except UnicodeEncodeError:
        return char.encode("utf-8", "surrogatepass")


def _hex_byte(byte: int, *, escaped_percent: bool = False) -> str:
    digits = "".join(f"[{d}{d.lower()}]" if d.isalpha() else d for d in f"{byte:02X}")
    return ("%25" if escaped_percent else "%") + digits


def _char_pattern(char: str) -> str:
    raw = _utf8(char)
    forms = [
        re.escape(char),
        "".join(_hex_byte(byte) for byte in raw),
        "".join(_hex_byte(byte, escaped_percent=True) for byte in raw),
    ]
    if char == " ":
        forms.append(r"\+")  # form-encoding of a space
    return f"(?:{'|'.join(forms)})"


@lru_cache(maxsize=256)
def _secret_pattern(secret: str) -> re.Pattern[str]:
    """Matches ``secret`` with any of its characters literal, %XX-encoded or %25XX-encoded."""
    return re.compile("".join(_char_pattern(char) for char in _fully_unquoted(secret)))


# --- one line -----------------------------------------------------------------------------------

# Control characters, surrogates and the separators str.splitlines() breaks on.
_UNSAFE_CATEGORIES = ("Cc", "Cs", "Zl", "Zp")


def _escaped(char: str, every_unprintable: bool) -> str:
    if every_unprintable:
        safe = char.isprintable()
    else:
        safe = unicodedata.category(char) not in _UNSAFE_CATEGORIES
    if safe:
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def one_line(
    text: str,
    max_chars: int | None = MAX_SHOWN_CHARS * 4,
    *,
    every_unprintable: bool = False,
    line_break: str | None = None,
    cut_marker: str = "…",
) -> str:
    """``text`` as one printable line: control characters escaped (with ``every_unprintable``,
    every character ``str.isprintable`` refuses, as ``unicode_escape`` writes it), cut at
    ``max_chars`` (None: never cut), the cut ending in ``cut_marker``. ``line_break``: what
    a newline becomes instead of its escape (a stored error message reads "a b", not
    "a\\x0ab")."""
    if line_break is not None:
        text = text.replace("\n", line_break)
    line = "".join(_escaped(char, every_unprintable) for char in text)
    if max_chars is None or len(line) <= max_chars:
        return line
    return line[: max_chars - len(cut_marker)] + cut_marker


def shown_value(value: object, max_chars: int = MAX_SHOWN_CHARS) -> str:
    """``repr(value)`` cut to ``max_chars``: how an error message quotes what it was given."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str() (4300 digits)
        return "<an integer too long to show>"
    return text if len(text) <= max_chars else text[: max_chars - 4] + "…" + text[-3:]

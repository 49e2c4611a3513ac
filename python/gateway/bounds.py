"""The bounds of what a client may send, in one place: every integer and every string a route or a
policy takes has one, so nothing a client sends reaches the ledger, the core or Redis as a value
they cannot hold. The core enforces the same figures on its side (`COUNT_CAP`, the request's
`MAX_MODEL_BYTES`)."""

from __future__ import annotations

from pydantic import AfterValidator

__all__ = [
    "MAX_COUNT",
    "MAX_MODEL_NAME",
    "MAX_NAME",
    "MAX_TIME_MS",
    "PlainText",
    "check_plain_text",
]

MAX_COUNT = 2**53 - 1
"""The largest count, limit, budget or price: exact in JSON (JavaScript's safe integers) and in
Redis' Lua numbers (the core's `COUNT_CAP` is one more), and far inside a BIGINT."""

MAX_TIME_MS = 253_402_300_799_999
"""The latest time a client may send, in unix milliseconds: the last one of year 9999."""

MAX_NAME = 256
"""The longest name a client may send: a key's, or a tenant or key named in a path or query."""

MAX_MODEL_NAME = 512
"""The longest model name, in characters (the core refuses longer ones in requests)."""


def check_plain_text(value: str | None) -> str | None:
    """`value` if it has no control character (a NUL, which PostgreSQL's text cannot hold, a
    newline, C1 controls), else ValueError."""
    if value is not None and any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in value):
        raise ValueError("control characters (NUL, newlines, ...) are not allowed")
    return value


PlainText = AfterValidator(check_plain_text)
"""A string's (or None's) validator: `check_plain_text`; with a `max_length`, pydantic also
refuses what is not Unicode text (lone surrogates)."""

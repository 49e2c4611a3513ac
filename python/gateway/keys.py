"""API key and id generation: keys are random, shown once, and stored only as SHA-256 hashes.

A key reads `tg-` followed by 43 URL-safe characters (256 random bits), so it is recognisable in
logs and secret scanners. The gateway core hashes the presented key the same way to look it up.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

__all__ = [
    "DISPLAY_PREFIX_LEN",
    "KEY_PREFIX",
    "GeneratedKey",
    "display_prefix",
    "generate_key",
    "hash_key",
    "is_key_id",
    "is_tenant_id",
    "new_key",
    "new_key_id",
    "new_tenant_id",
]

KEY_PREFIX = "tg-"
DISPLAY_PREFIX_LEN = 10

_KEY_ID = re.compile(r"key_[0-9a-f]{12}")
_TENANT_ID = re.compile(r"ten_[0-9a-f]{12}")


@dataclass(frozen=True, slots=True)
class GeneratedKey:
    """A fresh key: `key` goes to the user once; `hash` and `prefix` go to the ledger."""

    key: str
    hash: str
    prefix: str

    def __repr__(self) -> str:
        return f"GeneratedKey(prefix={self.prefix!r}, hash={self.hash!r})"


def generate_key() -> str:
    """A new secret API key: `tg-` + 43 URL-safe characters."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The lowercase hex SHA-256 of the full key string, as stored and as pushed to the core."""
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    """The first characters of a key, enough to recognise it in a listing, not to use it."""
    return key[:DISPLAY_PREFIX_LEN]


def new_key() -> GeneratedKey:
    """Generates a key with its hash and display prefix."""
    key = generate_key()
    return GeneratedKey(key=key, hash=hash_key(key), prefix=display_prefix(key))


def new_key_id() -> str:
    """A key id: `key_` + 12 hex characters."""
    return "key_" + secrets.token_hex(6)


def new_tenant_id() -> str:
    """A tenant id: `ten_` + 12 hex characters."""
    return "ten_" + secrets.token_hex(6)


def is_key_id(value: str) -> bool:
    """Whether `value` has the shape of a key id."""
    return _KEY_ID.fullmatch(value) is not None


def is_tenant_id(value: str) -> bool:
    """Whether `value` has the shape of a tenant id."""
    return _TENANT_ID.fullmatch(value) is not None

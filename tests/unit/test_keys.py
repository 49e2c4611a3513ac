"""API key and id generation."""

from __future__ import annotations

import hashlib
import re

from gateway.keys import (
    display_prefix,
    generate_key,
    hash_key,
    is_key_id,
    is_tenant_id,
    new_key,
    new_key_id,
    new_tenant_id,
)


def test_keys_are_prefixed_urlsafe_and_unique() -> None:
    keys = {generate_key() for _ in range(1000)}
    assert len(keys) == 1000
    for key in keys:
        assert re.fullmatch(r"tg-[A-Za-z0-9_-]{43}", key), key


def test_hash_is_sha256_hex_of_the_full_key() -> None:
    key = "tg-" + "a" * 43
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", hash_key(key))
    assert hash_key(key) != hash_key(key + "b")


def test_new_key_bundles_hash_and_prefix_and_hides_the_secret_from_repr() -> None:
    generated = new_key()
    assert generated.hash == hash_key(generated.key)
    assert generated.prefix == generated.key[:10] == display_prefix(generated.key)
    assert generated.prefix.startswith("tg-")
    assert generated.key not in repr(generated)


def test_ids_have_their_shapes() -> None:
    key_ids = {new_key_id() for _ in range(1000)}
    tenant_ids = {new_tenant_id() for _ in range(1000)}
    assert len(key_ids) == len(tenant_ids) == 1000
    assert all(re.fullmatch(r"key_[0-9a-f]{12}", i) for i in key_ids)
    assert all(re.fullmatch(r"ten_[0-9a-f]{12}", i) for i in tenant_ids)
    assert all(is_key_id(i) and not is_tenant_id(i) for i in key_ids)
    assert all(is_tenant_id(i) and not is_key_id(i) for i in tenant_ids)
    assert not is_tenant_id("ten_ABCDEF123456")

"""API keys of tenants: issue (the secret is returned once), list, revoke, and the core's snapshot.

Only the SHA-256 of a key is stored. Revocation is a timestamp, never a delete, so usage events keep
pointing at a key that existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from gateway.keys import new_key, new_key_id
from gateway.ledger.changes import record_change
from gateway.ledger.db import (
    Connection,
    NotFoundError,
    execute,
    now_ms,
    query,
    query_as,
    transaction,
)
from gateway.ledger.tenants import get_tenant_by_name_or_id

__all__ = [
    "ApiKey",
    "CreatedKey",
    "KeySnapshot",
    "SnapshotEntry",
    "active_key_snapshot",
    "create_key",
    "get_key",
    "list_keys",
    "revoke_key",
]

# In the order of `ApiKey`'s fields.
_COLUMNS = "k.id, k.tenant_id, t.name, k.prefix, k.name, k.created_at, k.revoked_at"
_FROM = "FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as listed: never the secret, never its hash. Times are unix milliseconds."""

    id: str
    tenant_id: str
    tenant_name: str
    prefix: str
    name: str | None
    created_at: int
    revoked_at: int | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A newly issued key: `key` is the full secret, available only here."""

    key: str
    record: ApiKey

    def __repr__(self) -> str:
        return f"CreatedKey(record={self.record!r})"


class SnapshotEntry(TypedDict):
    hash: str
    key_id: str
    tenant_id: str


class KeySnapshot(TypedDict):
    """The document `gateway._core.Gateway.set_keys` takes (as JSON)."""

    keys: list[SnapshotEntry]


def get_key(conn: Connection, key_id: str) -> ApiKey:
    """The key with this id; `NotFoundError` if there is none."""
    keys = query_as(conn, ApiKey, f"SELECT {_COLUMNS} {_FROM} WHERE k.id = ?", (key_id,))
    if not keys:
        raise NotFoundError(f"no API key with id {key_id!r}")
    return keys[0]


def create_key(conn: Connection, tenant: str, name: str | None = None) -> CreatedKey:
    """Issues a key for the tenant with this id or name; the secret is in the result only."""
    owner = get_tenant_by_name_or_id(conn, tenant)
    generated = new_key()
    key_id = new_key_id()
    with transaction(conn):
        execute(
            conn,
            "INSERT INTO api_keys (id, tenant_id, hash, prefix, name, created_at, revoked_at) "
            "VALUES (?, ?, ?, ?, ?, ?, NULL)",
            (key_id, owner.id, generated.hash, generated.prefix, name, now_ms()),
        )
        detail = {"name": name, "prefix": generated.prefix}
        record_change(conn, "key.created", key_id, owner.id, detail)
    return CreatedKey(key=generated.key, record=get_key(conn, key_id))


def list_keys(conn: Connection, tenant_id: str | None = None) -> list[ApiKey]:
    """Every key (revoked included), optionally of one tenant (by id); by tenant name, then
    creation time (ties, within a millisecond, by key id)."""
    sql = f"SELECT {_COLUMNS} {_FROM}"
    params: tuple[str, ...] = ()
    if tenant_id is not None:
        sql += " WHERE k.tenant_id = ?"
        params = (tenant_id,)
    return query_as(conn, ApiKey, sql + " ORDER BY t.name, k.created_at, k.id", params)


def revoke_key(conn: Connection, key_id: str) -> ApiKey:
    """Revokes a key; revoking a revoked key keeps its first revocation time."""
    with transaction(conn):
        revoked = execute(
            conn,
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (now_ms(), key_id),
        )
        if revoked:
            record_change(conn, "key.revoked", key_id, get_key(conn, key_id).tenant_id)
    return get_key(conn, key_id)


def usable_key_tenant(conn: Connection, key_hash: str) -> str | None:
    """The tenant id of the key hashed `key_hash` if the key is usable (not revoked, of a tenant
    not disabled, as in `active_key_snapshot`); None otherwise."""
    rows = query(
        conn,
        f"SELECT k.tenant_id {_FROM} WHERE k.hash = ? AND k.revoked_at IS NULL AND NOT t.disabled",
        (key_hash,),
    )
    return str(rows[0][0]) if rows else None


def active_key_snapshot(conn: Connection) -> KeySnapshot:
    """Every usable key: not revoked, of a tenant not disabled; ordered by key id so that equal
    snapshots serialise identically."""
    rows = query(
        conn,
        f"SELECT k.hash, k.id, k.tenant_id {_FROM} "
        "WHERE k.revoked_at IS NULL AND NOT t.disabled ORDER BY k.id",
    )
    return {"keys": [{"hash": row[0], "key_id": row[1], "tenant_id": row[2]} for row in rows]}

"""Quota policies of tenants and keys, and the policy snapshot the core enforces.

One policy per subject (a tenant id or a key id); setting one replaces the whole policy. The
policies of disabled tenants and revoked keys stay stored but leave the snapshot, as their keys
leave the key snapshot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TypedDict

from gateway.ledger.apikeys import ApiKey, get_key
from gateway.ledger.changes import record_change
from gateway.ledger.db import Connection, Row, execute, now_ms, query, transaction
from gateway.ledger.prices import prices_in_effect
from gateway.ledger.tenants import Tenant, get_tenant_by_name_or_id
from gateway.quotas import Limits, PriceEntry, QuotaPolicy, Scope

__all__ = [
    "PolicySnapshot",
    "Quota",
    "clear_quota",
    "get_quota",
    "list_quotas",
    "policy_snapshot",
    "set_key_quota",
    "set_tenant_quota",
]

# The policy's columns are named after `QuotaPolicy`'s fields, in their order.
_FIELDS = tuple(QuotaPolicy.model_fields)
_COLUMNS = ", ".join(_FIELDS)
_UPSERT = (
    f"INSERT INTO quota_policies (subject_id, scope, {_COLUMNS}, updated_at) "  # noqa: S608
    f"VALUES (?, ?, {', '.join('?' for _ in _FIELDS)}, ?) ON CONFLICT (subject_id) DO UPDATE SET "
    + ", ".join(f"{column} = excluded.{column}" for column in (*_FIELDS, "updated_at"))
)


@dataclass(frozen=True, slots=True)
class Quota:
    """A stored policy: whose it is, and when it was last set (unix ms)."""

    subject_id: str
    scope: Scope
    policy: QuotaPolicy
    updated_at: int


class PolicySnapshot(TypedDict):
    """The document `gateway._core.Gateway.set_policies` takes (as JSON)."""

    tenants: dict[str, Limits]
    keys: dict[str, Limits]
    prices: dict[str, PriceEntry]


def _policy(row: Row) -> QuotaPolicy:
    values = dict(zip(_FIELDS, row, strict=True))
    if values["models"] is not None:
        values["models"] = json.loads(values["models"])
    return QuotaPolicy.model_validate(values)


def _set(
    conn: Connection, subject_id: str, scope: Scope, tenant_id: str, policy: QuotaPolicy
) -> None:
    values = policy.model_dump()
    if values["models"] is not None:
        values["models"] = json.dumps(values["models"])
    with transaction(conn):
        execute(conn, _UPSERT, (subject_id, scope, *(values[f] for f in _FIELDS), now_ms()))
        detail = {"scope": scope, "policy": policy.model_dump(exclude_defaults=True)}
        record_change(conn, "quota.set", subject_id, tenant_id, detail)


def set_tenant_quota(conn: Connection, tenant: str, policy: QuotaPolicy) -> Tenant:
    """Replaces the policy of the tenant with this name or id; returns the tenant.

    `NotFoundError` if there is no such tenant.
    """
    owner = get_tenant_by_name_or_id(conn, tenant)
    _set(conn, owner.id, "tenant", owner.id, policy)
    return owner


def set_key_quota(conn: Connection, key_id: str, policy: QuotaPolicy) -> ApiKey:
    """Replaces the policy of one key (revoked keys included); returns the key.

    `NotFoundError` if there is no such key.
    """
    key = get_key(conn, key_id)
    _set(conn, key.id, "key", key.tenant_id, policy)
    return key


def get_quota(conn: Connection, subject_id: str) -> QuotaPolicy | None:
    """The policy of a tenant or key (by id), None if it has none (it is unlimited)."""
    rows = query(
        conn,
        f"SELECT {_COLUMNS} FROM quota_policies WHERE subject_id = ?",  # noqa: S608
        (subject_id,),
    )
    return _policy(rows[0]) if rows else None


def clear_quota(conn: Connection, subject_id: str) -> bool:
    """Removes the policy of a tenant or key (by id); returns whether there was one."""
    with transaction(conn):
        rows = query(conn, "SELECT scope FROM quota_policies WHERE subject_id = ?", (subject_id,))
        if not rows:
            return False
        execute(conn, "DELETE FROM quota_policies WHERE subject_id = ?", (subject_id,))
        scope = rows[0][0]
        tenant_id = subject_id if scope == "tenant" else get_key(conn, subject_id).tenant_id
        record_change(conn, "quota.cleared", subject_id, tenant_id, {"scope": scope})
        return True


def list_quotas(conn: Connection) -> list[Quota]:
    """Every stored policy, by subject id."""
    rows = query(
        conn,
        f"SELECT subject_id, scope, updated_at, {_COLUMNS} "  # noqa: S608
        "FROM quota_policies ORDER BY subject_id",
    )
    return [Quota(row[0], row[1], _policy(row[3:]), row[2]) for row in rows]


def policy_snapshot(conn: Connection, at_ms: int) -> PolicySnapshot:
    """Policies of tenants not disabled and of keys not revoked (of such tenants), and the prices
    in effect at `at_ms`; each map ordered by its key so that equal snapshots serialise alike."""
    tenants = query(
        conn,
        f"SELECT q.subject_id, {_COLUMNS} FROM quota_policies q "  # noqa: S608
        "JOIN tenants t ON t.id = q.subject_id WHERE NOT t.disabled ORDER BY q.subject_id",
    )
    keys = query(
        conn,
        f"SELECT q.subject_id, {_COLUMNS} FROM quota_policies q "  # noqa: S608
        "JOIN api_keys k ON k.id = q.subject_id JOIN tenants t ON t.id = k.tenant_id "
        "WHERE k.revoked_at IS NULL AND NOT t.disabled ORDER BY q.subject_id",
    )
    return {
        "tenants": {row[0]: _policy(row[1:]).limits() for row in tenants},
        "keys": {row[0]: _policy(row[1:]).limits() for row in keys},
        "prices": {model: price.entry() for model, price in prices_in_effect(conn, at_ms).items()},
    }

"""The change log: what was changed in tenants, keys, quota policies and prices, and when.

Each repository function that changes one of them calls `record_change` in its own transaction,
so the CLI and the admin API log alike and a change is logged exactly when it commits. A detail
holds what the change set (a policy, a price, a key's name and prefix), never a key's secret or
hash. Operators read the log (`recent_changes`); tenants do not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

from gateway.ledger.db import Connection, execute, now_ms, query

__all__ = ["ACTIONS", "Action", "Change", "recent_changes", "record_change"]

Action = Literal[
    "tenant.created",
    "tenant.disabled",
    "tenant.enabled",
    "key.created",
    "key.revoked",
    "quota.set",
    "quota.cleared",
    "price.set",
]
ACTIONS: tuple[Action, ...] = get_args(Action)


@dataclass(frozen=True, slots=True)
class Change:
    """One change: `seq` numbers changes in the order they committed; `subject_id` is the
    tenant, key or model changed; `tenant_id` the tenant it belongs to (None for a price)."""

    seq: int
    at_ms: int
    action: Action
    tenant_id: str | None
    subject_id: str
    detail: dict[str, Any]


def record_change(
    conn: Connection,
    action: Action,
    subject_id: str,
    tenant_id: str | None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Logs a change; call in the transaction that makes it (its write lock orders `seq`)."""
    execute(
        conn,
        "INSERT INTO changes (seq, at_ms, action, tenant_id, subject_id, detail) "
        "SELECT COALESCE(MAX(seq), 0) + 1, ?, ?, ?, ?, ? FROM changes",
        (
            now_ms(),
            action,
            tenant_id,
            subject_id,
            json.dumps(detail or {}, separators=(",", ":"), sort_keys=True),
        ),
    )


def recent_changes(conn: Connection, limit: int, tenant_id: str | None = None) -> list[Change]:
    """The last `limit` changes, newest first; of one tenant (its keys and quotas) if
    `tenant_id`."""
    sql = "SELECT seq, at_ms, action, tenant_id, subject_id, detail FROM changes"
    params: list[object] = []
    if tenant_id is not None:
        sql += " WHERE tenant_id = ?"
        params.append(tenant_id)
    sql += " ORDER BY seq DESC LIMIT ?"
    params.append(limit)
    return [
        Change(
            seq=int(row[0]),
            at_ms=int(row[1]),
            action=row[2],
            tenant_id=row[3],
            subject_id=row[4],
            detail=json.loads(row[5]),
        )
        for row in query(conn, sql, params)
    ]

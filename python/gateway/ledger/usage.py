"""Usage events: one per request, as drained from the core, stored once each, and their totals.

Events are append-only and idempotent by `event_id`: writing a batch twice, or from two writers at
once, stores each event once. Pricing, rollups and billing cursors are not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from gateway.ledger.db import Connection, executemany, now_ms, query_as, transaction

__all__ = [
    "UsageEvent",
    "UsageTotal",
    "insert_usage_events",
    "usage_totals",
]


class UsageEvent(NamedTuple):
    """One request's usage, field for field the tuple the core drains (`Gateway.drain_usage`,
    whose order is `gateway._core.USAGE_COLUMNS`) and the ledger's `usage_events` columns.

    The core is typed and the only producer, so drained tuples go to the ledger as they are.
    """

    event_id: str
    request_id: str
    tenant_id: str
    key_id: str
    model: str
    worker: str | None
    endpoint: str  # "chat.completions" | "completions"
    stream: bool
    status: str  # "completed" | "cancelled" | "failed"
    http_status: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    usage_source: str  # "worker" | "none"
    started_at_ms: int
    finished_at_ms: int


_FIELDS = UsageEvent._fields
_INSERT = (
    f"INSERT INTO usage_events ({', '.join(_FIELDS)}, recorded_at_ms) "  # noqa: S608
    f"VALUES ({', '.join('?' for _ in _FIELDS)}, ?) "
    "ON CONFLICT (event_id) DO NOTHING"
)


def insert_usage_events(conn: Connection, events: Sequence[tuple[object, ...]]) -> int:
    """Stores a batch (`UsageEvent`s or tuples in their order) in one transaction; returns how
    many events were new."""
    if not events:
        return 0
    recorded_at = now_ms()
    rows = [(*event, recorded_at) for event in events]
    with transaction(conn):
        return executemany(conn, _INSERT, rows)


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """Requests and tokens of one tenant and model (and status, when grouped by it)."""

    tenant_id: str
    tenant_name: str | None
    model: str
    status: str | None
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


def usage_totals(
    conn: Connection, tenant_id: str | None = None, *, by_status: bool = False
) -> list[UsageTotal]:
    """Totals per tenant and model (and status if `by_status`), optionally of one tenant.

    `tenant_name` is None for events of a tenant the ledger does not know.
    """
    status = "u.status" if by_status else "NULL"
    group = "u.tenant_id, t.name, u.model" + (", u.status" if by_status else "")
    # The columns in the order of `UsageTotal`'s fields.
    sql = (
        f"SELECT u.tenant_id, t.name, u.model, {status}, COUNT(*), "  # noqa: S608
        "SUM(u.prompt_tokens), SUM(u.cached_tokens), SUM(u.completion_tokens) "
        "FROM usage_events u LEFT JOIN tenants t ON t.id = u.tenant_id"
    )
    params: tuple[str, ...] = ()
    if tenant_id is not None:
        sql += " WHERE u.tenant_id = ?"
        params = (tenant_id,)
    sql += f" GROUP BY {group} ORDER BY t.name, u.tenant_id, u.model"
    if by_status:
        sql += ", u.status"
    return query_as(conn, UsageTotal, sql, params)

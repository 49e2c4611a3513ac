"""Usage events: one per request, as drained from the core, stored once each, and their totals.

Events are append-only and idempotent by `event_id`: writing a batch twice, or from two writers at
once, stores each event once. An event id already stored with a different payload is a conflict:
the stored event stays, and the conflict is logged. Rollups and billing cursors are not here;
pricing is only what the core's budget counters need at start-up (`spent_in_current_periods`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypedDict

from gateway.ledger.db import Connection, executemany, now_ms, query, query_as, transaction
from gateway.ledger.prices import PRICES_IN_EFFECT_SQL
from gateway.quotas import MICROS, Period, Scope, period_bounds

logger = logging.getLogger(__name__)

__all__ = [
    "SpentEntry",
    "UsageEvent",
    "UsageTotal",
    "insert_usage_events",
    "spent_in_current_periods",
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
    status: str  # "completed" | "cancelled" | "failed" | "interrupted"
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
        inserted = executemany(conn, _INSERT, rows)
        if inserted < len(rows):
            _log_conflicts(conn, events)
    return inserted


def _log_conflicts(conn: Connection, events: Sequence[tuple[object, ...]]) -> None:
    """Logs every event of `events` whose id the ledger holds with another payload."""
    batch = {str(event[0]): tuple(event) for event in events}
    ids = list(batch)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        stored = query(
            conn,
            f"SELECT {', '.join(_FIELDS)} FROM usage_events "  # noqa: S608
            f"WHERE event_id IN ({', '.join('?' for _ in chunk)})",
            chunk,
        )
        for row in stored:
            new = batch[str(row[0])]
            if tuple(row) != new:
                differing = [
                    f"{name}: stored {old!r}, new {value!r}"
                    for name, old, value in zip(_FIELDS, row, new, strict=True)
                    if old != value
                ]
                logger.error(
                    "usage event %s conflicts with the one stored (kept): %s",
                    row[0],
                    "; ".join(differing),
                )


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
    # NULLS FIRST: where SQLite puts them; PostgreSQL would put them last.
    sql += f" GROUP BY {group} ORDER BY t.name NULLS FIRST, u.tenant_id, u.model"
    if by_status:
        sql += ", u.status"
    return query_as(conn, UsageTotal, sql, params)


class SpentEntry(TypedDict):
    """One entry of the list `gateway._core.Gateway.seed_spent` takes (as JSON)."""

    scope: Scope
    id: str
    tenant_id: str  # the key's tenant; for a tenant, `id` again
    period: Period
    tokens: int
    money_micros: int


# Per event of the current month: its tenant and key, whether it is of the current day, its tokens
# and its cost, rounded up to a whole micro-unit, at the prices in effect now (0 if unpriced);
# cached tokens count at most the prompt, as in the core. Parameters: now, month start, month end,
# day start, day end.
_SPENT = f"""
WITH price AS ({PRICES_IN_EFFECT_SQL}),
month AS (
    SELECT tenant_id, key_id, model, started_at_ms, prompt_tokens, completion_tokens,
        CASE WHEN cached_tokens < prompt_tokens THEN cached_tokens ELSE prompt_tokens END AS cached
    FROM usage_events WHERE started_at_ms >= ? AND started_at_ms < ?
),
event AS (
    SELECT m.tenant_id, m.key_id,
        CASE WHEN m.started_at_ms >= ? AND m.started_at_ms < ? THEN 1 ELSE 0 END AS today,
        m.prompt_tokens + m.completion_tokens AS tokens,
        COALESCE(((m.prompt_tokens - m.cached) * p.prompt_per_mtok
            + m.cached * p.cached_per_mtok
            + m.completion_tokens * p.completion_per_mtok + {MICROS - 1}) / {MICROS}, 0) AS money
    FROM month m LEFT JOIN price p ON p.model = m.model
)
SELECT 'tenant', tenant_id, tenant_id,
    SUM(today * tokens), SUM(today * money), SUM(tokens), SUM(money)
FROM event GROUP BY tenant_id
UNION ALL
SELECT 'key', key_id, tenant_id, SUM(today * tokens), SUM(today * money), SUM(tokens), SUM(money)
FROM event GROUP BY key_id, tenant_id
ORDER BY 1 DESC, 2
"""  # noqa: S608


def spent_in_current_periods(conn: Connection, at_ms: int) -> list[SpentEntry]:
    """What each tenant and each key spent in the UTC day and the UTC month containing `at_ms`.

    Tokens are prompt plus completion tokens of the events that started in the period; money is
    the sum over those events of each one's cost rounded up to a micro-unit, at the prices in
    effect at `at_ms`. Every tenant and key with an event this month gets a "day" and a "month"
    entry (the day's may be zero), with the tenant id (of the key); tenants first, then keys,
    each by id.
    """
    day, month = period_bounds("day", at_ms), period_bounds("month", at_ms)
    rows = query(conn, _SPENT, (at_ms, *month, *day))
    periods: tuple[Period, Period] = ("day", "month")
    return [
        {
            "scope": row[0],
            "id": row[1],
            "tenant_id": row[2],
            "period": period,
            "tokens": int(row[3 + 2 * i]),
            "money_micros": int(row[4 + 2 * i]),
        }
        for row in rows
        for i, period in enumerate(periods)
    ]

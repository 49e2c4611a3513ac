"""Usage events: one per request, as drained from the core, stored once each, and their totals.

Events are append-only and idempotent by `event_id`: writing a batch twice, or from two writers at
once, stores each event once. An event id already stored with a different payload is a conflict:
the stored event stays, and the conflict is logged.

Storing an event makes it billable, in the write transaction that inserts it:
- its token classes are made disjoint: `prompt_tokens` keeps only the prompt tokens not served
  from the prefix cache (the core reports them as the worker does, cached ones included);
- it is priced at the price version in effect at its start, recorded in `price_effective_at`,
  and its cost, rounded up to a micro-unit, in `cost_micros`; an event of a model without a price
  then has both NULL (unpriced: flagged, never billed at zero); a version added later, even one
  backdated, never reprices a stored event;
- it gets the next `seq`, the commit order billing consumers page by: write transactions run one
  at a time (`db.transaction`), so events become visible in `seq` order, without gaps;
- it is added to the rollups (`rollups.add_to_rollups`).

A SQLite ledger is written by the extension (`db.native_usage_writer`: the same contract, in
native code, where binding the values through Python's driver cost as much as SQLite's own work);
PostgreSQL, and SQLite in a process with two SQLite libraries, through SQL here
(`insert_usage_events_sql`). The tests hold both to the same results.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, TypedDict

from gateway.bounds import MAX_COUNT
from gateway.ledger.db import (
    Connection,
    DatabaseError,
    IntegrityError,
    insert_rows,
    native_usage_writer,
    now_ms,
    query,
    query_as,
    transaction,
)
from gateway.ledger.rollups import add_to_rollups
from gateway.quotas import MICROS, Period, Scope, period_bounds

logger = logging.getLogger(__name__)

__all__ = [
    "TENANT_CURSOR_START",
    "SpentEntry",
    "StoredEvent",
    "UsageEvent",
    "UsageTotal",
    "decode_cursor",
    "decode_tenant_cursor",
    "encode_cursor",
    "encode_tenant_cursor",
    "events_after",
    "insert_usage_events",
    "insert_usage_events_sql",
    "spent_in_current_periods",
    "usage_totals",
]


class UsageEvent(NamedTuple):
    """One request's usage: the core's `UsageEvent` (rust/core/src/usage.rs), field for field
    and by name (`gateway._core.USAGE_FIELDS`); `Gateway.drain_usage` builds these.

    The core is typed and the only producer, so drained events are taken as they are. Here, as
    from the worker, `prompt_tokens` includes `cached_tokens`; the ledger stores them disjoint.
    """

    event_id: str
    request_id: str
    tenant_id: str
    key_id: str
    model: str
    worker: str | None
    endpoint: str  # "chat.completions" | "completions" | "embeddings"
    stream: bool
    status: str  # "completed" | "cancelled" | "failed" | "interrupted"
    http_status: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    usage_source: str  # "worker" | "gateway" | "none"
    started_at_ms: int
    finished_at_ms: int


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as the ledger holds it. Token classes are disjoint: `prompt_tokens` are the prompt
    tokens not served from cache, `cached_tokens` those that were. `price_effective_at` and
    `cost_micros` are None for an unpriced event."""

    seq: int
    event_id: str
    request_id: str
    tenant_id: str
    key_id: str
    model: str
    worker: str | None
    endpoint: str
    stream: bool
    status: str
    http_status: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    usage_source: str
    started_at_ms: int
    finished_at_ms: int
    recorded_at_ms: int
    price_effective_at: int | None
    cost_micros: int | None

    @property
    def priced(self) -> bool:
        return self.cost_micros is not None


_FIELDS = UsageEvent._fields
_PRICING = ("seq", "price_effective_at", "cost_micros", "recorded_at_ms")
_COLUMNS = _FIELDS + _PRICING
_PROMPT: Final = 10
_COMPLETION: Final = 12
# `_disjoint` and `insert_usage_events` take the fields from `prompt_tokens` on by position.
if _FIELDS[_PROMPT:] != (
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "usage_source",
    "started_at_ms",
    "finished_at_ms",
):
    raise ImportError("UsageEvent's fields from prompt_tokens on are not the expected ones")

Row = tuple[object, ...]


def _disjoint(event: UsageEvent) -> Row:
    """`event` as a row, `prompt_tokens` less its cached tokens (cached ones capped at the
    prompt)."""
    prompt, cached = event.prompt_tokens, event.cached_tokens
    if cached > prompt:
        cached = prompt
    return (*event[:_PROMPT], prompt - cached, cached, *event[_COMPLETION:])


Version = tuple[int, int, int, int]
"""A price version: effective at, then micro-units per million prompt, cached and completion
tokens."""


class _PriceBook:
    """The versions of some models' prices, to price events by their start time."""

    def __init__(self, conn: Connection, models: Iterable[str]) -> None:
        # Per model: the versions' times, and the versions.
        self._versions: dict[str, tuple[list[int], list[Version]]] = {}
        names = sorted(set(models))
        for first in range(0, len(names), 500):
            chunk = names[first : first + 500]
            rows = query(
                conn,
                "SELECT model, effective_at, prompt_per_mtok, cached_per_mtok, "  # noqa: S608
                f"completion_per_mtok FROM prices WHERE model IN ({', '.join('?' * len(chunk))}) "
                "ORDER BY model, effective_at",
                chunk,
            )
            for model, effective_at, *price in rows:
                times, versions = self._versions.setdefault(model, ([], []))
                times.append(effective_at)
                versions.append((effective_at, price[0], price[1], price[2]))

    def version(self, model: str, started_at_ms: int) -> Version | None:
        """The version of `model`'s prices in effect at `started_at_ms`; None when unpriced."""
        versions = self._versions.get(model)
        if versions is None:
            return None
        times, prices = versions
        at = bisect_right(times, started_at_ms) - 1
        return prices[at] if at >= 0 else None


def insert_usage_events(conn: Connection, events: Sequence[UsageEvent]) -> int:
    """Stores a batch in one transaction, in its order; returns how many events were new. Raises
    `DatabaseError` with nothing of the batch stored (`IntegrityError` for an event the schema
    refuses)."""
    writer = native_usage_writer(conn)
    if writer is None:
        return insert_usage_events_sql(conn, events)
    from gateway._core import LedgerIntegrityError, LedgerWriteError

    try:
        inserted, conflicts = writer.insert(list(events), now_ms())
    except LedgerIntegrityError as exc:
        raise IntegrityError(str(exc)) from exc
    except LedgerWriteError as exc:
        raise DatabaseError(str(exc)) from exc
    for kept, new, stored in conflicts:
        if stored:
            _log_conflict(kept, new, "the one stored", "stored")
        else:
            _log_conflict(kept, new, "an earlier one of its batch", "earlier")
    return inserted


def insert_usage_events_sql(conn: Connection, events: Sequence[UsageEvent]) -> int:
    """`insert_usage_events` through SQL, on any dialect.

    The per-event work is kept to one pass (disjoint classes, price, `seq`) building the row
    the database takes; rows are inserted in bulk (`db.insert_rows`) and the rollups summed per
    batch before they are written (`rollups.add_to_rollups`)."""
    batch: dict[str, UsageEvent] = {}
    for event in events:
        first = batch.setdefault(event.event_id, event)
        if first is not event and first != event:
            kept, new = _disjoint(first), _disjoint(event)
            if kept != new:
                _log_conflict(kept, new, "an earlier one of its batch", "earlier")
    if not batch:
        return 0
    with transaction(conn):
        for stored in _stored(conn, list(batch)):
            new = _disjoint(batch.pop(str(stored[0])))
            if stored != new:
                _log_conflict(stored, new, "the one stored", "stored")
        if not batch:
            return 0
        last = query(conn, "SELECT MAX(seq) FROM usage_events")[0][0]
        seq = int(last or 0)
        book = _PriceBook(conn, {str(event.model) for event in batch.values()})
        version = book.version
        recorded_at = now_ms()
        rows: list[Row] = []
        append = rows.append
        for event in batch.values():
            prompt, cached, completion, source, started, finished = event[_PROMPT:]
            if cached > prompt:
                cached = prompt
            prompt -= cached
            seq += 1
            price = version(event.model, started)
            if price is None:
                effective_at = cost = None
            else:
                effective_at, per_prompt, per_cached, per_completion = price
                fine = prompt * per_prompt + cached * per_cached + completion * per_completion
                # Rounded up to a micro-unit, and at most `MAX_COUNT`, so that it fits a BIGINT
                # whatever a worker reported.
                cost = min(-(-fine // MICROS), MAX_COUNT)
            # Concatenated tuples, not unpacking: a slice of a tuple is copied without iterating.
            tail = (prompt, cached, completion, source, started, finished)
            append(event[:_PROMPT] + tail + (seq, effective_at, cost, recorded_at))
        insert_rows(conn, "usage_events", _COLUMNS, rows)
        add_to_rollups(conn, rows)
    return len(rows)


def _stored(conn: Connection, ids: list[str]) -> list[Row]:
    """The events of `ids` the ledger holds, as the core's fields (disjoint classes)."""
    found: list[Row] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        found += query(
            conn,
            f"SELECT {', '.join(_FIELDS)} FROM usage_events "  # noqa: S608
            f"WHERE event_id IN ({', '.join('?' for _ in chunk)})",
            chunk,
        )
    return found


def _log_conflict(kept: Row, new: Row, what: str, label: str) -> None:
    differing = [
        f"{name}: {label} {old!r}, new {value!r}"
        for name, old, value in zip(_FIELDS, kept, new, strict=True)
        if old != value
    ]
    logger.error("usage event %s conflicts with %s (kept): %s", kept[0], what, "; ".join(differing))


# Two kinds of cursor, told apart by their prefix. A read of every tenant's events pages by the
# global commit order, `seq`: its cursor encodes a `seq`. A read of one tenant's events must not
# encode it (the gaps between one tenant's cursors would count the other tenants' events): its
# cursor encodes the id of the tenant's last event seen, which the tenant already has, and reading
# it looks up that event's `seq` among the tenant's own events.
_CURSOR_PREFIX = "evc1."
_TENANT_CURSOR_PREFIX = "evt1."

_MAX_EVENT_ID = 128
TENANT_CURSOR_START = _TENANT_CURSOR_PREFIX + "start"
"""The tenant cursor before a tenant's first event: what a tenant's first page, if empty, gives."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(body: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        return None


def encode_cursor(seq: int) -> str:
    """The opaque cursor of the position after the event numbered `seq` (0: the beginning) in
    the order of every tenant's events."""
    return _CURSOR_PREFIX + _b64(seq.to_bytes(8, "big"))


def decode_cursor(cursor: str) -> int:
    """The `seq` a cursor from `encode_cursor` stands after; `ValueError` for anything else (a
    tenant cursor included)."""
    if cursor.startswith(_TENANT_CURSOR_PREFIX):
        raise ValueError(
            f"{cursor!r} is a cursor of one tenant's events; this read is of every tenant's"
        )
    raw = _unb64(cursor.removeprefix(_CURSOR_PREFIX)) or b""
    seq = int.from_bytes(raw, "big")
    # Only the one spelling `encode_cursor` gives, and only what fits a BIGINT.
    if len(raw) != 8 or seq >= 2**63 or encode_cursor(seq) != cursor:
        raise ValueError(f"not a usage event cursor: {cursor!r}")
    return seq


def encode_tenant_cursor(event_id: str | None) -> str:
    """The opaque cursor of the position after the event `event_id` in its tenant's events
    (None: `TENANT_CURSOR_START`). It holds the event's id and nothing else."""
    if event_id is None:
        return TENANT_CURSOR_START
    return _TENANT_CURSOR_PREFIX + _b64(event_id.encode())


def decode_tenant_cursor(conn: Connection, cursor: str, tenant_id: str) -> int:
    """The `seq` a cursor from `encode_tenant_cursor` stands after, among the events of
    `tenant_id` (0 for `TENANT_CURSOR_START`); `ValueError` for anything else: a global cursor,
    or the cursor of an event the tenant does not have (whether it is another tenant's or none
    at all, the answer is the same)."""
    if cursor == TENANT_CURSOR_START:
        return 0
    if cursor.startswith(_CURSOR_PREFIX):
        raise ValueError(
            f"{cursor!r} is a cursor of every tenant's events; this read is of one tenant's"
        )
    raw = _unb64(cursor.removeprefix(_TENANT_CURSOR_PREFIX)) or b""
    event_id = raw.decode("ascii", errors="replace")
    # Only the one spelling `encode_tenant_cursor` gives, of an id such as the core makes (a
    # database may refuse what else a client could put in one, a NUL for one).
    if not (
        0 < len(raw) <= _MAX_EVENT_ID
        and event_id.isprintable()
        and encode_tenant_cursor(event_id) == cursor
    ):
        raise ValueError(f"not a usage event cursor: {cursor!r}")
    rows = query(
        conn,
        "SELECT seq FROM usage_events WHERE event_id = ? AND tenant_id = ?",
        (event_id, tenant_id),
    )
    if not rows:
        raise ValueError(f"not a cursor of this tenant's usage events: {cursor!r}")
    return int(rows[0][0])


_STORED_COLUMNS = ", ".join(StoredEvent.__dataclass_fields__)


def events_after(
    conn: Connection, after_seq: int, limit: int, tenant_id: str | None = None
) -> list[StoredEvent]:
    """Up to `limit` events following `after_seq` in commit order (of one tenant, if given).

    Paging by the last event's `seq` sees every event exactly once, whatever the writers do
    meanwhile: events become visible in `seq` order (see the module's docstring).
    """
    sql = f"SELECT {_STORED_COLUMNS} FROM usage_events WHERE seq > ?"  # noqa: S608
    params: list[object] = [after_seq]
    if tenant_id is not None:
        sql += " AND tenant_id = ?"
        params.append(tenant_id)
    sql += " ORDER BY seq LIMIT ?"
    params.append(limit)
    return [_stored_event(*row) for row in query(conn, sql, params)]


def _stored_event(*row: object) -> StoredEvent:
    event = StoredEvent(*row)  # type: ignore[arg-type]
    # SQLite has no boolean type: it gives 0 and 1.
    return dataclasses.replace(event, stream=bool(event.stream))


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """Requests, tokens (disjoint classes) and cost of one tenant and model (and status, when
    grouped by it); `cost_micros` sums the priced events, `unpriced_requests` counts the others."""

    tenant_id: str
    tenant_name: str | None
    model: str
    status: str | None
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_micros: int
    unpriced_requests: int


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
        "SUM(u.prompt_tokens), SUM(u.cached_tokens), SUM(u.completion_tokens), "
        "COALESCE(SUM(u.cost_micros), 0), SUM(CASE WHEN u.cost_micros IS NULL THEN 1 ELSE 0 END) "
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


# Per tenant, then per key, with an event this month: the tenant, then tokens and cost of the
# day's events, then of the month's, from the rollups' days (UTC days tile a UTC month).
# Parameters: day start, day end (twice), month start, month end.
_TODAY = "CASE WHEN bucket_start >= ? AND bucket_start < ? THEN {} ELSE 0 END"
_SUMS = (
    f"SUM({_TODAY.format('prompt_tokens + cached_tokens + completion_tokens')}), "
    f"SUM({_TODAY.format('cost_micros')}), "
    "SUM(prompt_tokens + cached_tokens + completion_tokens), SUM(cost_micros)"
)
_DAYS = "FROM usage_rollups WHERE bucket_width = '1d' AND bucket_start >= ? AND bucket_start < ?"
_SPENT = """
SELECT 'tenant', tenant_id, tenant_id, {sums} {days} GROUP BY tenant_id
UNION ALL
SELECT 'key', key_id, tenant_id, {sums} {days} GROUP BY key_id, tenant_id
ORDER BY 1 DESC, 2
"""


def spent_in_current_periods(
    conn: Connection, at_ms: int, tenant_id: str | None = None
) -> list[SpentEntry]:
    """What each tenant and each key spent in the UTC day and the UTC month containing `at_ms`.

    Tokens are all tokens of the events that started in the period; money is the sum of their
    costs (unpriced events cost nothing here: the core refuses unpriced models to a tenant with a
    money budget). Every tenant and key with an event this month gets a "day" and a "month"
    entry (the day's may be zero), with the tenant id (of the key); tenants first, then keys,
    each by id; of one tenant and its keys if `tenant_id`.
    """
    day, month = period_bounds("day", at_ms), period_bounds("month", at_ms)
    days = _DAYS
    params: tuple[int | str, ...] = (*day, *day, *month)
    if tenant_id is not None:
        days, params = f"{_DAYS} AND tenant_id = ?", (*params, tenant_id)
    rows = query(conn, _SPENT.format(sums=_SUMS, days=days), params * 2)
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

"""Usage rollups: per UTC minute, hour and day, tenant, key and model, the sums of the events that
started in it. Derived data, never a counter anything resets: `add_to_rollups` adds the events a
transaction stores, in that transaction, and `rebuild_rollups` recomputes every row from the
events.

`usage_page` reads them as buckets, the shape of OpenAI's organisation usage API.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from gateway.ledger.db import Connection, add_to_sums, execute, query, transaction

__all__ = [
    "BUCKET_LIMITS",
    "BUCKET_WIDTHS",
    "GROUP_KEYS",
    "Bucket",
    "BucketResult",
    "BucketWidth",
    "Group",
    "GroupKey",
    "UsagePage",
    "Window",
    "add_to_rollups",
    "grouped_buckets",
    "rebuild_rollups",
    "usage_page",
]

BucketWidth = Literal["1m", "1h", "1d"]
BUCKET_WIDTHS: dict[BucketWidth, int] = {"1m": 60_000, "1h": 3_600_000, "1d": 86_400_000}
"""Each bucket width and its length in milliseconds; buckets start at multiples of it."""

BUCKET_LIMITS: dict[BucketWidth, tuple[int, int]] = {
    "1m": (60, 1440),
    "1h": (24, 168),
    "1d": (7, 31),
}
"""Each width's default and largest number of buckets per page (OpenAI's)."""

GroupKey = Literal["tenant_id", "api_key_id", "model"]
GROUP_KEYS: tuple[GroupKey, ...] = get_args(GroupKey)
_GROUP_COLUMNS: dict[GroupKey, str] = {
    "tenant_id": "tenant_id",
    "api_key_id": "key_id",
    "model": "model",
}

_SUMS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_micros")
_KEY = ("bucket_width", "bucket_start", "tenant_id", "key_id", "model")
# A group of events' `_SUMS` and `_COUNTS`, in SQL.
_SQL_SUMS = (
    "COUNT(*), SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens), "
    "COALESCE(SUM(cost_micros), 0), SUM(CASE WHEN cost_micros IS NULL THEN 1 ELSE 0 END), "
    "SUM(CASE WHEN status IN ('failed', 'interrupted') THEN 1 ELSE 0 END)"
)
# Positions in the rows `usage.insert_usage_events` stores (`usage._FIELDS` then pricing).
_TENANT, _KEY_ID, _MODEL, _STATUS = 2, 3, 4, 8
_PROMPT, _CACHED, _COMPLETION, _STARTED = 10, 11, 12, 14
_COST = 18

_MINUTE, _HOUR, _DAY = (BUCKET_WIDTHS[width] for width in ("1m", "1h", "1d"))
if not _DAY % _HOUR == _HOUR % _MINUTE == 0:  # hours are summed from minutes, days from hours
    raise ImportError("each bucket width must divide the next")

Sums = list[int]
"""requests, prompt, cached and completion tokens, cost, unpriced requests, failed requests:
`_SUMS`, then `_COUNTS`."""
_COUNTS = ("unpriced_requests", "failed_requests")
# A request that ended in an error: the worker's, or a stream cut short.
_FAILED = ("failed", "interrupted")


def _sums(rows: list[Sequence[object]]) -> Sums:
    """The sums of some events' rows."""
    if len(rows) == 1:
        row = rows[0]
        cost = row[_COST]
        return [
            1,
            int(row[_PROMPT]),  # type: ignore[call-overload]
            int(row[_CACHED]),  # type: ignore[call-overload]
            int(row[_COMPLETION]),  # type: ignore[call-overload]
            0 if cost is None else int(cost),  # type: ignore[call-overload]
            1 if cost is None else 0,
            1 if row[_STATUS] in _FAILED else 0,
        ]
    # Columns, then a sum of each (in C): a cost of None is an unpriced event, and leaving out
    # the costs that are None or 0 leaves the sum as it is.
    columns = list(zip(*rows, strict=True))
    costs = columns[_COST]
    return [
        len(rows),
        sum(columns[_PROMPT]),
        sum(columns[_CACHED]),
        sum(columns[_COMPLETION]),
        sum(filter(None, costs)),
        costs.count(None),
        sum(status in _FAILED for status in columns[_STATUS]),
    ]


def _coarser(
    totals: dict[tuple[int, object, object, object], Sums], ms: int
) -> dict[tuple[int, object, object, object], Sums]:
    """`totals` of (bucket start, tenant, key, model) summed into buckets of `ms`, a multiple of
    their width."""
    coarser: dict[tuple[int, object, object, object], Sums] = {}
    for (start, tenant, key, model), sums in totals.items():
        bucket = (start - start % ms, tenant, key, model)
        total = coarser.get(bucket)
        coarser[bucket] = (
            sums if total is None else [a + b for a, b in zip(total, sums, strict=True)]
        )
    return coarser


def add_to_rollups(conn: Connection, rows: Sequence[Sequence[object]]) -> None:
    """Adds newly stored events (rows as `usage.insert_usage_events` inserts them) to the rollups;
    call in the transaction that stores them.

    The batch is summed in memory first, so each rollup row gets one upsert per batch: events are
    grouped by minute bucket, tenant, key and model (one dictionary operation each), each group
    is summed a column at a time, and hours and days are summed from the minutes."""
    groups: dict[tuple[int, object, object, object], list[Sequence[object]]] = {}
    for row in rows:
        started: int = row[_STARTED]  # type: ignore[assignment]
        bucket = (started - started % _MINUTE, row[_TENANT], row[_KEY_ID], row[_MODEL])
        group = groups.get(bucket)
        if group is None:
            groups[bucket] = [row]
        else:
            group.append(row)
    minutes = {bucket: _sums(group) for bucket, group in groups.items()}
    hours = _coarser(minutes, _HOUR)
    days = _coarser(hours, _DAY)
    add_to_sums(
        conn,
        "usage_rollups",
        _KEY,
        (*_SUMS, *_COUNTS),
        [
            (width, *bucket, *sums)
            for width, totals in (("1m", minutes), ("1h", hours), ("1d", days))
            for bucket, sums in totals.items()
        ],
    )


def rebuild_rollups(conn: Connection) -> None:
    """Recomputes every rollup from the events, in one transaction."""
    with transaction(conn):
        execute(conn, "DELETE FROM usage_rollups")
        for width, ms in BUCKET_WIDTHS.items():
            bucket = f"started_at_ms - started_at_ms % {ms}"
            execute(
                conn,
                f"INSERT INTO usage_rollups ({', '.join(_KEY + _SUMS + _COUNTS)}) "  # noqa: S608
                f"SELECT '{width}', {bucket}, tenant_id, key_id, model, {_SQL_SUMS} "
                f"FROM usage_events GROUP BY {bucket}, tenant_id, key_id, model",
            )


@dataclass(frozen=True, slots=True)
class BucketResult:
    """The sums of one group in one bucket; a group key is None when not grouped by it.

    `prompt_tokens` excludes `cached_tokens` (disjoint classes); `cost_micros` sums the priced
    events, `unpriced_requests` counts the others; `failed_requests` counts those that ended in an
    error (the worker's, or a stream cut short: status `failed` or `interrupted`).
    """

    tenant_id: str | None
    api_key_id: str | None
    model: str | None
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_micros: int
    unpriced_requests: int
    failed_requests: int


@dataclass(frozen=True, slots=True)
class Bucket:
    """[start_ms, end_ms) and its results, one per group with events (none: no events)."""

    start_ms: int
    end_ms: int
    results: list[BucketResult]


@dataclass(frozen=True, slots=True)
class UsagePage:
    """Consecutive buckets; `next_start_ms` is where the next page starts, None on the last."""

    buckets: list[Bucket]
    next_start_ms: int | None


@dataclass(frozen=True, slots=True)
class Window:
    """Up to `limit` buckets of `width` from the one containing `start_ms` (buckets are aligned
    to UTC multiples of the width) to `end_ms`, exclusive: the buckets a page lists."""

    width: BucketWidth
    start_ms: int
    end_ms: int
    limit: int

    @property
    def starts(self) -> range:
        """The start of each bucket of the page."""
        ms = BUCKET_WIDTHS[self.width]
        first = self.start_ms - self.start_ms % ms
        return range(first, min(self.end_ms, first + self.limit * ms), ms)

    @property
    def next_start_ms(self) -> int | None:
        """Where the next page starts, None on the last."""
        stop = self.starts.stop
        return stop if stop < self.end_ms else None


Group = dict[str, Any]
"""A result's group: the value of each key it is grouped by."""


def grouped_buckets(
    conn: Connection,
    table: str,
    window: Window,
    columns: Mapping[str, str],
    sums: Sequence[str],
    tenant_id: str | None,
) -> list[tuple[int, int, list[tuple[Group, list[int]]]]]:
    """The rows of a rollup `table` in `window` (of one tenant if `tenant_id`) summed by bucket
    and by the group keys `columns` names (key -> column): per bucket of the window, empty ones
    too, its start, its end, and each group with its totals of `sums`, sorted by the keys. Table
    and column names are the caller's own, never input."""
    starts = window.starts
    selected = ", ".join(["bucket_start", *columns.values()])
    totals = ", ".join(f"SUM({column})" for column in sums)
    sql = (
        f"SELECT {selected}, {totals} FROM {table} "  # noqa: S608
        "WHERE bucket_width = ? AND bucket_start >= ? AND bucket_start < ?"
    )
    params: list[object] = [window.width, starts.start, starts.stop]
    if tenant_id is not None:
        sql += " AND tenant_id = ?"
        params.append(tenant_id)
    sql += f" GROUP BY {selected} ORDER BY {selected}"
    found: dict[int, list[tuple[Group, list[int]]]] = {}
    for row in query(conn, sql, params):
        group = dict(zip(columns, row[1 : 1 + len(columns)], strict=True))
        found.setdefault(int(row[0]), []).append(
            (group, [int(value) for value in row[1 + len(columns) :]])
        )
    return [(start, start + starts.step, found.get(start, [])) for start in starts]


def usage_page(
    conn: Connection,
    width: BucketWidth,
    start_ms: int,
    end_ms: int,
    *,
    limit: int,
    group_by: Collection[GroupKey] = (),
    tenant_id: str | None = None,
) -> UsagePage:
    """Up to `limit` buckets of `width` from the one containing `start_ms` (buckets are aligned to
    UTC multiples of the width) to `end_ms` (exclusive), every bucket listed, empty ones too; of
    one tenant if `tenant_id`. Results are grouped by `group_by` and sorted by its keys."""
    window = Window(width, start_ms, end_ms, limit)
    columns: dict[str, str] = {k: _GROUP_COLUMNS[k] for k in GROUP_KEYS if k in group_by}
    sums = (*_SUMS, *_COUNTS)
    buckets = [
        Bucket(
            start,
            end,
            [
                BucketResult(
                    group.get("tenant_id"), group.get("api_key_id"), group.get("model"), *totals
                )
                for group, totals in results
            ],
        )
        for start, end, results in grouped_buckets(
            conn, "usage_rollups", window, columns, sums, tenant_id
        )
    ]
    return UsagePage(buckets, window.next_start_ms)

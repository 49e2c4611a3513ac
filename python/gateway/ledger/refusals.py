"""Refused requests over time: per UTC minute, hour and day, tenant, key and reason, the counts of
requests the core refused to a known key (`gateway._core.Gateway.drain_refusals`): a tenant's
429s over quota, and every other refusal after its key was accepted.

A count is added to the buckets of the time it was drained (within a collection interval of the
refusal). Not billing data: nothing is charged for a refusal, and counts a process had not handed
over are lost with it. `refusal_page` reads them in the buckets `rollups.usage_page` uses.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Literal, TypedDict, get_args

from gateway.ledger.db import Connection, add_to_sums, transaction
from gateway.ledger.rollups import BUCKET_WIDTHS, BucketWidth, Window, grouped_buckets

__all__ = [
    "REFUSAL_GROUP_KEYS",
    "RefusalBucket",
    "RefusalGroupKey",
    "RefusalPage",
    "RefusalResult",
    "Refused",
    "add_refusals",
    "refusal_page",
]


class Refused(TypedDict):
    """One entry of what `gateway._core.Gateway.drain_refusals` hands over."""

    tenant_id: str
    key_id: str
    reason: str
    count: int


RefusalGroupKey = Literal["tenant_id", "api_key_id", "reason"]
REFUSAL_GROUP_KEYS: tuple[RefusalGroupKey, ...] = get_args(RefusalGroupKey)
_COLUMNS: dict[RefusalGroupKey, str] = {
    "tenant_id": "tenant_id",
    "api_key_id": "key_id",
    "reason": "reason",
}


def add_refusals(conn: Connection, at_ms: int, refused: Iterable[Refused]) -> None:
    """Adds counts drained at `at_ms` to the buckets of every width that contain it, in one
    transaction."""
    counts: dict[tuple[str, str, str], int] = {}
    for entry in refused:
        key = (entry["tenant_id"], entry["key_id"], entry["reason"])
        counts[key] = counts.get(key, 0) + entry["count"]
    if not counts:
        return
    rows = [
        (width, at_ms - at_ms % ms, *key, count)
        for width, ms in BUCKET_WIDTHS.items()
        for key, count in counts.items()
    ]
    with transaction(conn):
        add_to_sums(
            conn,
            "refusal_rollups",
            ("bucket_width", "bucket_start", "tenant_id", "key_id", "reason"),
            ("requests",),
            rows,
        )


@dataclass(frozen=True, slots=True)
class RefusalResult:
    """Refusals of one group in one bucket; a group key is None when not grouped by it."""

    tenant_id: str | None
    api_key_id: str | None
    reason: str | None
    requests: int


@dataclass(frozen=True, slots=True)
class RefusalBucket:
    """[start_ms, end_ms) and its results, one per group with refusals."""

    start_ms: int
    end_ms: int
    results: list[RefusalResult]


@dataclass(frozen=True, slots=True)
class RefusalPage:
    """Consecutive buckets; `next_start_ms` is where the next page starts, None on the last."""

    buckets: list[RefusalBucket]
    next_start_ms: int | None


def refusal_page(
    conn: Connection,
    width: BucketWidth,
    start_ms: int,
    end_ms: int,
    *,
    limit: int,
    group_by: Collection[RefusalGroupKey] = (),
    tenant_id: str | None = None,
) -> RefusalPage:
    """Up to `limit` buckets of refusals, as `rollups.usage_page` lists usage: every bucket,
    empty ones too; of one tenant if `tenant_id`; grouped by `group_by`."""
    window = Window(width, start_ms, end_ms, limit)
    columns: dict[str, str] = {k: _COLUMNS[k] for k in REFUSAL_GROUP_KEYS if k in group_by}
    buckets = [
        RefusalBucket(
            start,
            end,
            [
                RefusalResult(
                    group.get("tenant_id"), group.get("api_key_id"), group.get("reason"), *totals
                )
                for group, totals in results
            ],
        )
        for start, end, results in grouped_buckets(
            conn, "refusal_rollups", window, columns, ("requests",), tenant_id
        )
    ]
    return RefusalPage(buckets, window.next_start_ms)

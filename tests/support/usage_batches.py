"""Batches of usage events for tests of the ledger's write paths, and what a ledger holds after
them: mixed tenants, keys and models across minute, hour, day and month ends, priced by versions
that change inside a minute."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable

from gateway.ledger.db import Connection, query
from gateway.ledger.prices import set_price
from gateway.ledger.rollups import BUCKET_WIDTHS
from gateway.ledger.usage import StoredEvent, UsageEvent, events_after
from tests.support.events import ms, price
from tests.support.events import usage_event as event

__all__ = ["START", "comparable", "mixed", "priced", "recomputed", "rollups", "stored"]

START = ms("2024-03-31T22:58:00")  # two minutes before an hour, a day and a month end


def stored(conn: Connection) -> list[StoredEvent]:
    return events_after(conn, 0, 1_000_000)


def recomputed(events: Iterable[StoredEvent]) -> list[tuple[object, ...]]:
    """The rollups of `events`, computed one event at a time, as `usage_rollups` rows."""
    sums: dict[tuple[object, ...], list[int]] = {}
    for e in events:
        for width, length in BUCKET_WIDTHS.items():
            bucket = e.started_at_ms - e.started_at_ms % length
            total = sums.setdefault((width, bucket, e.tenant_id, e.key_id, e.model), [0] * 7)
            total[0] += 1
            total[1] += e.prompt_tokens
            total[2] += e.cached_tokens
            total[3] += e.completion_tokens
            total[4] += e.cost_micros or 0
            total[5] += e.cost_micros is None
            total[6] += e.status in ("failed", "interrupted")
    return sorted((*key, *total) for key, total in sums.items())


def rollups(conn: Connection) -> list[tuple[object, ...]]:
    return query(conn, "SELECT * FROM usage_rollups ORDER BY 1, 2, 3, 4, 5")


def priced(conn: Connection) -> None:
    """m1 priced from the start, m2 from the middle of a minute (events of one rollup row are
    then priced and unpriced), m3 priced at zero (cost 0 is priced, not unpriced), m4 never."""
    set_price(conn, "m1", price(1_000, 10, 3_000), effective_at=0)
    set_price(conn, "m1", price(2_000, 20, 5_000), effective_at=START + 90_000)
    set_price(conn, "m2", price(7_000_001, 3, 999_999), effective_at=START + 30_000)
    set_price(conn, "m3", price(0, 0, 0), effective_at=0)


def mixed(rng: random.Random, count: int) -> list[UsageEvent]:
    """Events of 3 tenants, 2 keys each and 4 models, across minute, hour, day and month ends, of
    every status; some with more cached tokens than prompt tokens."""
    events = []
    for _ in range(count):
        tenant = rng.choice(["ten_a", "ten_b", "ten_c"])
        prompt = rng.randrange(0, 2_000)
        events.append(
            event(
                tenant_id=tenant,
                key_id=f"{tenant}_key_{rng.randrange(2)}",
                model=rng.choice(["m1", "m2", "m3", "m4"]),
                started_at_ms=START + rng.randrange(4 * 60_000),
                prompt_tokens=prompt,
                cached_tokens=rng.choice([0, prompt // 3, prompt + 5]),
                completion_tokens=rng.randrange(0, 800),
                status=rng.choice(["completed", "completed", "cancelled", "failed", "interrupted"]),
            )
        )
    return events


def comparable(event: StoredEvent) -> StoredEvent:
    """A stored event without its `recorded_at_ms`, which differs between two ledgers."""
    return dataclasses.replace(event, recorded_at_ms=0)

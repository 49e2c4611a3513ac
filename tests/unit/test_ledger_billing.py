"""What makes stored events billable, on both backends: disjoint token classes, pricing at the
version in effect at each event's start, commit order and cursors, rollups, and invoices."""

from __future__ import annotations

import random

import pytest

from gateway.bounds import MAX_COUNT
from gateway.ledger.db import Connection, execute, open_ledger, query
from gateway.ledger.invoices import InvoiceLine, invoice, invoice_csv, month_bounds
from gateway.ledger.prices import set_price
from gateway.ledger.rollups import BUCKET_WIDTHS, rebuild_rollups, usage_page
from gateway.ledger.schema import SCHEMA_VERSION
from gateway.ledger.usage import (
    UsageEvent,
    decode_cursor,
    encode_cursor,
    events_after,
    insert_usage_events,
    usage_totals,
)
from tests.support.events import ms, price
from tests.support.events import usage_event as event
from tests.support.ledger_versions import downgrade


def rollups(conn: Connection) -> list[tuple[object, ...]]:
    return query(conn, "SELECT * FROM usage_rollups ORDER BY 1, 2, 3, 4, 5")


def test_events_are_priced_at_the_version_in_effect_at_their_start(ledger: Connection) -> None:
    set_price(ledger, "m", price(1_000_000, 500_000, 2_000_000), effective_at=ms("2024-01-01"))
    set_price(ledger, "m", price(3_000_000, 0, 0), effective_at=ms("2024-06-01"))
    set_price(ledger, "cheap", price(150_000, 0, 0), effective_at=0)
    insert_usage_events(
        ledger,
        [
            # 6 uncached at 1, 4 cached at 0.5, 5 completion at 2: 6 + 2 + 10 micro-units.
            event(
                event_id="a",
                model="m",
                started_at_ms=ms("2024-05-31T23:59:59"),
                prompt_tokens=10,
                cached_tokens=4,
                completion_tokens=5,
            ),
            event(
                event_id="b",
                model="m",
                started_at_ms=ms("2024-06-01"),
                prompt_tokens=10,
                cached_tokens=4,
                completion_tokens=5,
            ),
            # 0.15 micro-units round up to 1, never down to 0.
            event(event_id="c", model="cheap", prompt_tokens=1, cached_tokens=0),
            # Before the model's first price, and a model never priced: unpriced, not free.
            event(event_id="d", model="m", started_at_ms=ms("2023-12-31")),
            event(event_id="e", model="unknown"),
            # More cached than prompt tokens (a worker's bug): the cache counts at most the prompt.
            event(
                event_id="f",
                model="m",
                started_at_ms=ms("2024-02-01"),
                prompt_tokens=3,
                cached_tokens=5,
                completion_tokens=0,
            ),
        ],
    )
    stored = {e.event_id: e for e in events_after(ledger, 0, 100)}
    assert {k: (e.price_effective_at, e.cost_micros) for k, e in stored.items()} == {
        "a": (ms("2024-01-01"), 18),
        "b": (ms("2024-06-01"), 18),
        "c": (0, 1),
        "d": (None, None),
        "e": (None, None),
        "f": (ms("2024-01-01"), 2),
    }
    assert (stored["a"].prompt_tokens, stored["a"].cached_tokens) == (6, 4)
    assert (stored["f"].prompt_tokens, stored["f"].cached_tokens) == (0, 3)
    assert not stored["e"].priced
    assert stored["a"].priced
    # A version added later, even backdated, never reprices a stored event.
    set_price(ledger, "m", price(9, 9, 9), effective_at=ms("2024-05-01"))
    assert events_after(ledger, 0, 1)[0].cost_micros == 18


def test_the_largest_counts_and_prices_are_stored_and_priced_within_a_bigint(
    ledger: Connection,
) -> None:
    """The core caps a worker's counts at 2^53 and policies cap prices at 2^53 - 1: their
    product is far past a BIGINT, so the cost saturates at 2^53 - 1 instead of failing the
    batch (which would hold back every event behind it)."""
    set_price(ledger, "m", price(MAX_COUNT, MAX_COUNT, MAX_COUNT), effective_at=0)
    huge = 2**53
    insert_usage_events(
        ledger,
        [
            event(event_id="max", model="m", prompt_tokens=huge, cached_tokens=huge),
            event(event_id="next", model="m", prompt_tokens=1, cached_tokens=0),
        ],
    )
    stored = {e.event_id: e for e in events_after(ledger, 0, 10)}
    assert stored["max"].cost_micros == MAX_COUNT
    assert stored["next"].cost_micros == -(-(MAX_COUNT + 5 * MAX_COUNT) // 1_000_000)


def test_seq_is_the_commit_order_without_gaps_and_cursors_page_it(ledger: Connection) -> None:
    first = [event(tenant_id="ten_a") for _ in range(5)]
    insert_usage_events(ledger, first)
    # A batch of known and new events: only the new ones take numbers.
    second = [first[1], event(tenant_id="ten_b"), first[3], event(tenant_id="ten_a")]
    assert insert_usage_events(ledger, second) == 2
    everything = events_after(ledger, 0, 100)
    assert [e.seq for e in everything] == list(range(1, 8))
    expected_ids = [e.event_id for e in first] + [second[1].event_id, second[3].event_id]
    assert [e.event_id for e in everything] == expected_ids

    seen: list[str] = []
    cursor = encode_cursor(0)
    while page := events_after(ledger, decode_cursor(cursor), 3):
        seen += [e.event_id for e in page]
        cursor = encode_cursor(page[-1].seq)
    assert seen == expected_ids
    only_b = events_after(ledger, 0, 100, tenant_id="ten_b")
    assert [e.event_id for e in only_b] == [second[1].event_id]
    assert [e.seq for e in events_after(ledger, 5, 100, tenant_id="ten_a")] == [7]


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "7",
        "evc1.",
        "evc1.!!!!",
        "evc1.AAAA",
        "other.AAAAAAAAAAA",
        "evc1.AAAAAAAAAAE=",  # a valid cursor's other spelling
        "evc1.gAAAAAAAAAA",  # 2**63: past a BIGINT
    ],
)
def test_a_malformed_cursor_is_refused(cursor: str) -> None:
    with pytest.raises(ValueError, match="not a usage event cursor"):
        decode_cursor(cursor)


def test_cursors_round_trip() -> None:
    for seq in (0, 1, 255, 2**40 + 7, 2**63 - 1):
        assert decode_cursor(encode_cursor(seq)) == seq


def test_rollups_are_the_events_summed_and_a_rebuild_finds_them_equal(ledger: Connection) -> None:
    rng = random.Random(7)
    set_price(ledger, "m1", price(1_000, 10, 3_000), effective_at=0)
    start = ms("2024-03-01")
    events = [
        event(
            tenant_id=rng.choice(["ten_a", "ten_b"]),
            key_id=rng.choice(["key_1", "key_2"]),
            model=rng.choice(["m1", "m2"]),
            started_at_ms=start + rng.randrange(3 * 86_400_000),
            prompt_tokens=rng.randrange(100),
            cached_tokens=rng.randrange(20),
            completion_tokens=rng.randrange(100),
        )
        for _ in range(400)
    ]
    for first in range(0, 400, 37):
        insert_usage_events(ledger, events[first : first + 37])
    insert_usage_events(ledger, events[:100])  # known again: counted once
    incremental = rollups(ledger)
    rebuild_rollups(ledger)
    assert rollups(ledger) == incremental
    # Each width sums to the same totals as the events.
    totals = query(
        ledger,
        "SELECT COUNT(*), SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens), "
        "SUM(cost_micros) FROM usage_events",
    )[0]
    for width in BUCKET_WIDTHS:
        sums = query(
            ledger,
            "SELECT SUM(requests), SUM(prompt_tokens), SUM(cached_tokens), "
            "SUM(completion_tokens), SUM(cost_micros) FROM usage_rollups WHERE bucket_width = ?",
            (width,),
        )[0]
        assert sums == totals
    unpriced = query(
        ledger, "SELECT SUM(unpriced_requests) FROM usage_rollups WHERE bucket_width = '1d'"
    )[0][0]
    assert unpriced == sum(1 for e in events if e.model == "m2")


def test_usage_page_lists_every_bucket_groups_and_pages(ledger: Connection) -> None:
    day = ms("2024-03-01")
    set_price(ledger, "m1", price(1_000_000, 0, 0), effective_at=0)
    insert_usage_events(
        ledger,
        [
            event(
                tenant_id="ten_a",
                model="m1",
                started_at_ms=day + 1,
                prompt_tokens=10,
                cached_tokens=4,
                completion_tokens=1,
            ),
            event(
                tenant_id="ten_a",
                model="m2",
                started_at_ms=day + 2,
                prompt_tokens=5,
                cached_tokens=0,
                completion_tokens=2,
            ),
            event(
                tenant_id="ten_b",
                model="m1",
                started_at_ms=day + 2 * 86_400_000 + 5,
                prompt_tokens=1,
                cached_tokens=0,
                completion_tokens=3,
            ),
        ],
    )
    # From mid-day: the first bucket is still the whole UTC day.
    page = usage_page(ledger, "1d", day + 3_600_000, day + 5 * 86_400_000, limit=2)
    assert [(b.start_ms - day, b.end_ms - day) for b in page.buckets] == [
        (0, 86_400_000),
        (86_400_000, 2 * 86_400_000),
    ]
    assert page.next_start_ms == day + 2 * 86_400_000
    [whole] = page.buckets[0].results
    assert (whole.tenant_id, whole.model, whole.requests) == (None, None, 2)
    assert (whole.prompt_tokens, whole.cached_tokens, whole.completion_tokens) == (11, 4, 3)
    assert (whole.cost_micros, whole.unpriced_requests) == (6, 1)
    assert page.buckets[1].results == []

    rest = usage_page(
        ledger,
        "1d",
        page.next_start_ms,
        day + 5 * 86_400_000,
        limit=7,
        group_by=("model", "tenant_id"),
    )
    assert rest.next_start_ms is None
    assert len(rest.buckets) == 3
    [b] = rest.buckets[0].results
    assert (b.tenant_id, b.api_key_id, b.model, b.requests) == ("ten_b", None, "m1", 1)

    grouped = usage_page(ledger, "1m", day, day + 60_000, limit=60, group_by=["model"])
    assert [(r.model, r.requests) for r in grouped.buckets[0].results] == [("m1", 1), ("m2", 1)]
    only_b = usage_page(ledger, "1h", day, day + 86_400_000, limit=24, tenant_id="ten_b")
    assert all(bucket.results == [] for bucket in only_b.buckets)


def test_an_invoice_prices_each_line_once_and_flags_unpriced_usage(ledger: Connection) -> None:
    set_price(ledger, "m", price(1_000_000, 500_000, 2_000_000), effective_at=ms("2024-01-01"))
    set_price(ledger, "m", price(2_000_000, 500_000, 2_000_000), effective_at=ms("2024-05-20"))
    set_price(ledger, "cheap", price(150_000, 0, 0), effective_at=0)

    def use(at: str, model: str, p: int, c: int, o: int, tenant: str = "ten_a") -> UsageEvent:
        return event(
            tenant_id=tenant,
            model=model,
            started_at_ms=ms(at),
            prompt_tokens=p,
            cached_tokens=c,
            completion_tokens=o,
        )

    insert_usage_events(
        ledger,
        [
            use("2024-05-01", "m", 10, 4, 5),
            use("2024-05-02", "m", 20, 0, 1),
            use("2024-05-25", "m", 1, 0, 0),
            use("2024-05-03", "cheap", 1, 0, 0),
            use("2024-05-04", "cheap", 1, 0, 0),
            use("2024-05-05", "free", 7, 0, 3),
            use("2024-04-30T23:59:59.999", "m", 100, 0, 100),  # April
            use("2024-06-01", "m", 100, 0, 100),  # June
            use("2024-05-06", "m", 100, 0, 100, tenant="ten_b"),  # another tenant
        ],
    )
    bill = invoice(ledger, "ten_a", "2024-05")
    assert (
        (bill.start_ms, bill.end_ms)
        == month_bounds("2024-05")
        == (ms("2024-05-01"), ms("2024-06-01"))
    )
    assert bill.lines == [
        # 0.3 micro-units for two requests: rounded once per line, up.
        InvoiceLine("cheap", 0, "prompt", 2, 150_000, 1),
        InvoiceLine("free", None, "prompt", 7, None, None),
        InvoiceLine("free", None, "completion", 3, None, None),
        InvoiceLine("m", ms("2024-01-01"), "prompt", 26, 1_000_000, 26),
        InvoiceLine("m", ms("2024-01-01"), "cached", 4, 500_000, 2),
        InvoiceLine("m", ms("2024-01-01"), "completion", 6, 2_000_000, 12),
        InvoiceLine("m", ms("2024-05-20"), "prompt", 1, 2_000_000, 2),
    ]
    assert (bill.requests, bill.unpriced_requests, bill.total_micros) == (6, 1, 43)
    # Never more than the events' own costs, each rounded up.
    events = [e for e in events_after(ledger, 0, 100) if e.tenant_id == "ten_a"]
    in_may = [e for e in events if bill.start_ms <= e.started_at_ms < bill.end_ms]
    assert sum(e.cost_micros or 0 for e in in_may) == 44 >= bill.total_micros

    csv = invoice_csv(bill).splitlines()
    assert csv[0] == (
        "tenant_id,period,model,price_effective_at,token_class,quantity,"
        "unit_price_per_mtok_micros,amount_micros"
    )
    assert csv[1] == "ten_a,2024-05,cheap,0,prompt,2,150000,1"
    assert csv[2] == "ten_a,2024-05,free,,prompt,7,,"
    assert len(csv) == 1 + len(bill.lines)
    assert invoice(ledger, "ten_nobody", "2024-05").lines == []


@pytest.mark.parametrize(
    "period", ["2024-13", "2024-00", "24-05", "2024-5", "May", "1969-12", "9999-12"]
)
def test_a_period_is_a_month(period: str) -> None:
    with pytest.raises(ValueError, match="YYYY-MM"):
        month_bounds(period)


def test_a_version_2_ledger_migrates_its_events_to_billable_ones(ledger_url: str) -> None:
    with open_ledger(ledger_url) as old:
        downgrade(old, 2)
        execute(
            old,
            "INSERT INTO prices VALUES ('m', 0, 1000000, 500000, 2000000, 0)",
        )
        for event_id, recorded, model in (("b", 20, "m"), ("a", 20, "m"), ("c", 10, "x")):
            execute(
                old,
                "INSERT INTO usage_events VALUES "
                "(?, 'r', 'ten_a', 'key_1', ?, NULL, 'completions', ?, 'completed', 200, "
                "10, 4, 5, 'worker', 5, 6, ?)",
                (event_id, model, False, recorded),
            )
    with open_ledger(ledger_url) as conn:
        assert query(conn, "SELECT MAX(version) FROM schema_version") == [(SCHEMA_VERSION,)]
        stored = [
            (e.seq, e.event_id, e.prompt_tokens, e.cached_tokens, e.cost_micros)
            for e in events_after(conn, 0, 10)
        ]
        assert stored == [(1, "c", 6, 4, None), (2, "a", 6, 4, 18), (3, "b", 6, 4, 18)]
        migrated = rollups(conn)
        assert len(migrated) == 6  # two models, three widths
        rebuild_rollups(conn)
        assert rollups(conn) == migrated
        insert_usage_events(conn, [event(event_id="d")])
        assert events_after(conn, 3, 10)[0].seq == 4
        assert [t.requests for t in usage_totals(conn)] == [1, 2, 1]

"""The ledger's bulk write path, on both backends: a batch is deduplicated (inside itself and
against the events stored), priced, numbered and inserted in one pass, and its rollups are summed
in memory before one upsert per rollup row; what it stores equals what storing each event on its
own would, and the rollups equal a recomputation from the stored events."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.ledger.db import Connection, add_to_sums, execute, open_ledger, query, transaction
from gateway.ledger.rollups import rebuild_rollups
from gateway.ledger.usage import insert_usage_events
from tests.support.events import usage_event as event
from tests.support.services.postgres import PostgresServer
from tests.support.usage_batches import (
    START,
    comparable,
    mixed,
    priced,
    recomputed,
    rollups,
    stored,
)


@pytest.fixture
def reference_url(request: pytest.FixtureRequest, ledger_url: str, tmp_path: Path) -> Iterator[str]:
    """A second fresh ledger on the backend of `ledger_url`."""
    if ledger_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'reference.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    with server.database() as url:
        yield url


def test_a_batch_is_stored_as_its_events_one_by_one_and_its_rollups_are_their_sums(
    ledger: Connection, reference_url: str
) -> None:
    rng = random.Random(16)
    priced(ledger)
    events = mixed(rng, 600)
    assert insert_usage_events(ledger, events) == 600
    rows = stored(ledger)
    with open_ledger(reference_url) as one_by_one:
        priced(one_by_one)
        for e in events:
            assert insert_usage_events(one_by_one, [e]) == 1
        assert list(map(comparable, stored(one_by_one))) == list(map(comparable, rows))
        assert rollups(one_by_one) == rollups(ledger)
    assert [s.seq for s in rows] == list(range(1, 601)), "batch order, without gaps"
    assert [s.event_id for s in rows] == [e.event_id for e in events]
    assert any(s.cost_micros is None for s in rows if s.model == "m2")
    assert any(s.cost_micros for s in rows if s.model == "m2")
    assert all(s.cost_micros == 0 for s in rows if s.model == "m3")
    assert any(s.prompt_tokens == 0 < s.cached_tokens for s in rows), "cached capped at prompt"
    assert rollups(ledger) == recomputed(rows)
    incremental = rollups(ledger)
    rebuild_rollups(ledger)
    assert rollups(ledger) == incremental


def test_ids_repeated_in_a_batch_and_ids_already_stored_are_stored_and_summed_once(
    ledger: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(4)
    priced(ledger)
    first = mixed(rng, 300)
    assert insert_usage_events(ledger, first[:200]) == 200
    # After a crash the journal delivers stored events again, mixed with new ones, some twice,
    # and one (a bug elsewhere) with another payload: the stored one stays.
    new = first[200:]
    changed = first[5]._replace(completion_tokens=first[5].completion_tokens + 1)
    inside = new[3]._replace(status="interrupted")
    middle = [*first[150:200], *new, *new[:40], *first[:10]]
    rng.shuffle(middle)
    # `changed` first: the stored event's own payload later in the batch conflicts with it, and
    # it with the stored one; `inside` after the event whose id it repeats.
    batch = [changed, *middle, inside]
    with caplog.at_level("ERROR", logger="gateway.ledger.usage"):
        assert insert_usage_events(ledger, batch) == 100
    assert "conflicts with the one stored (kept)" in caplog.text
    assert "conflicts with an earlier one of its batch (kept)" in caplog.text
    rows = stored(ledger)
    assert len(rows) == 300
    assert len({s.event_id for s in rows}) == 300
    assert [s.seq for s in rows] == list(range(1, 301))
    by_id = {s.event_id: s for s in rows}
    assert by_id[first[5].event_id].completion_tokens == first[5].completion_tokens
    assert by_id[new[3].event_id].status == new[3].status
    assert rollups(ledger) == recomputed(rows)
    # The whole of it again: nothing new, nothing counted twice.
    before = rollups(ledger)
    assert insert_usage_events(ledger, [*first, *batch]) == 0
    assert rollups(ledger) == before
    assert len(stored(ledger)) == 300


def test_equal_payloads_that_differ_only_in_overlapping_cached_tokens_are_no_conflict(
    ledger: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    # 12 and 15 cached of 10 prompt tokens are both stored as 0 and 10: the same event.
    one = event(prompt_tokens=10, cached_tokens=12)
    again = one._replace(cached_tokens=15)
    with caplog.at_level("ERROR", logger="gateway.ledger.usage"):
        assert insert_usage_events(ledger, [one, again]) == 1
        assert insert_usage_events(ledger, [again]) == 0
    assert caplog.text == ""
    assert [(s.prompt_tokens, s.cached_tokens) for s in stored(ledger)] == [(0, 10)]


def test_many_events_of_one_rollup_row_and_one_event_per_row_sum_alike(
    ledger: Connection,
) -> None:
    priced(ledger)
    same_row = [
        event(model="m2", started_at_ms=START + 29_000 + i, prompt_tokens=i, cached_tokens=i % 7)
        for i in range(2_000)
    ]  # one minute, m2 priced from its middle: priced and unpriced events in one row
    apart = [
        event(model="m1", key_id=f"key_{i}", started_at_ms=START + i * 61_000) for i in range(50)
    ]
    assert insert_usage_events(ledger, same_row + apart) == 2_050
    rows = stored(ledger)
    assert rollups(ledger) == recomputed(rows)
    minute = query(
        ledger,
        "SELECT requests, unpriced_requests FROM usage_rollups "
        "WHERE bucket_width = '1m' AND model = 'm2'",
    )
    assert len(minute) == 1
    assert minute[0][0] == 2_000
    assert minute[0][1] == sum(1 for s in rows if s.model == "m2" and s.cost_micros is None)
    assert 0 < minute[0][1] < 2_000


def test_sums_are_added_to_stored_rows_and_new_keys_inserted(ledger: Connection) -> None:
    execute(
        ledger,
        "CREATE TABLE sums (name TEXT NOT NULL, at BIGINT NOT NULL, a BIGINT NOT NULL, "
        "b BIGINT NOT NULL, PRIMARY KEY (name, at))",
    )
    with transaction(ledger):
        add_to_sums(ledger, "sums", ("name", "at"), ("a", "b"), [("x", 1, 2, 3), ("y", 1, 4, 5)])
    with transaction(ledger):
        add_to_sums(ledger, "sums", ("name", "at"), ("a", "b"), [("x", 1, 10, 20), ("x", 2, 1, 1)])
        add_to_sums(ledger, "sums", ("name", "at"), ("a", "b"), [])
    assert query(ledger, "SELECT * FROM sums ORDER BY name, at") == [
        ("x", 1, 12, 23),
        ("x", 2, 1, 1),
        ("y", 1, 4, 5),
    ]

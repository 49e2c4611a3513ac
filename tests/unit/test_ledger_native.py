"""The SQLite ledger's native write path (`db.native_usage_writer`, in
rust/core/src/ledger/sqlite.rs) against the SQL one (`usage.insert_usage_events_sql`, the path
PostgreSQL takes): the same batches store the same rows and rollups, count the same new events and
log the same conflicts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gateway.bounds import MAX_COUNT
from gateway.ledger import db
from gateway.ledger.db import (
    Connection,
    DatabaseError,
    IntegrityError,
    native_usage_writer,
    open_ledger,
)
from gateway.ledger.usage import UsageEvent, insert_usage_events, insert_usage_events_sql
from tests.support.events import usage_event as event
from tests.support.usage_batches import START, comparable, mixed, priced, rollups, stored


def test_sqlite_ledgers_are_written_natively_here(ledger: Connection) -> None:
    # So that every SQLite test of the ledger runs the native path, and PostgreSQL's the SQL one.
    assert (native_usage_writer(ledger) is not None) == (ledger.dialect == "sqlite")


def batches(rng: random.Random, rounds: int) -> list[list[UsageEvent]]:
    """Batches as a restarted gateway hands them over: new events, some repeated inside their
    batch, stored ones delivered again, and now and then one with another payload."""
    out: list[list[UsageEvent]] = []
    seen: list[UsageEvent] = []
    for _ in range(rounds):
        batch = mixed(rng, rng.randrange(1, 300))
        batch += rng.sample(batch, min(len(batch), rng.randrange(0, 20)))
        batch += rng.sample(seen, min(len(seen), rng.randrange(0, 40)))
        if seen and rng.random() < 0.5:
            old = rng.choice(seen)
            batch.append(old._replace(completion_tokens=old.completion_tokens + 1))
        if rng.random() < 0.5:
            inside = rng.choice(batch)
            batch.append(inside._replace(status="interrupted"))
        rng.shuffle(batch)
        seen += batch
        out.append(batch)
    return out


def test_both_paths_store_the_same_rows_and_rollups_and_log_the_same_conflicts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(23)
    # Beyond what any worker reports: classes and costs at their limits.
    huge = [
        event(model="m2", started_at_ms=START + 40_000, prompt_tokens=2**62, cached_tokens=3),
        event(model="m1", started_at_ms=START, completion_tokens=MAX_COUNT, cached_tokens=2**61),
        event(model="m4", started_at_ms=START - 1, prompt_tokens=0, cached_tokens=0),
    ]
    with (
        open_ledger(f"sqlite:///{tmp_path / 'native.db'}") as native,
        open_ledger(f"sqlite:///{tmp_path / 'sql.db'}") as sql,
    ):
        assert native_usage_writer(native) is not None
        priced(native)
        priced(sql)
        for batch in [huge, *batches(rng, 15)]:
            logged = []
            for conn, insert in ((native, insert_usage_events), (sql, insert_usage_events_sql)):
                caplog.clear()
                with caplog.at_level("ERROR", logger="gateway.ledger.usage"):
                    count = insert(conn, batch)
                logged.append((count, [record.getMessage() for record in caplog.records]))
            assert logged[0] == logged[1]
        rows = stored(native)
        assert list(map(comparable, rows)) == list(map(comparable, stored(sql)))
        assert rollups(native) == rollups(sql)
    assert any(row.cost_micros == MAX_COUNT for row in rows)
    assert len({row.recorded_at_ms for row in rows}) > 1, "one recording time per batch"


def test_without_one_sqlite_library_the_sql_path_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Python whose `sqlite3` embeds its own SQLite: the extension's must not open the file.
    monkeypatch.setattr(db, "_one_sqlite_library", lambda: False)
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as conn:
        assert native_usage_writer(conn) is None
        assert insert_usage_events(conn, [event(), event()]) == 2
        assert len(stored(conn)) == 2


def test_the_extension_and_python_run_one_sqlite_library() -> None:
    # The check itself, uncached: the two modules resolve SQLite's symbols to one address here
    # (Debian's libsqlite3 under both).
    assert db._one_sqlite_library.__wrapped__()


def test_a_closed_writer_refuses_a_batch_as_a_database_failure(tmp_path: Path) -> None:
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as conn:
        writer = native_usage_writer(conn)
        assert writer is not None
        writer.close()
        with pytest.raises(DatabaseError, match="closed") as refused:
            insert_usage_events(conn, [event()])
        assert not isinstance(refused.value, IntegrityError)

"""The ledger against a real SQLite file: schema, tenants, keys, the key snapshot, usage events."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from gateway.keys import hash_key
from gateway.ledger.apikeys import active_key_snapshot, create_key, get_key, list_keys, revoke_key
from gateway.ledger.db import (
    SCHEMA_VERSION,
    ConflictError,
    Connection,
    LedgerError,
    NotFoundError,
    connect,
    open_ledger,
    parse_url,
    schema_version,
)
from gateway.ledger.tenants import (
    create_tenant,
    get_tenant_by_name_or_id,
    list_tenants,
    set_tenant_disabled,
)
from gateway.ledger.usage import insert_usage_events, usage_totals
from tests.conftest import usage_event as event


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def conn(url: str) -> Iterator[Connection]:
    with open_ledger(url) as connection:
        yield connection


def count_events(conn: Connection) -> int:
    with closing(conn.execute("SELECT COUNT(*) FROM usage_events")) as cursor:
        row = cursor.fetchone()
    return int(row[0])


# --- database -------------------------------------------------------------------------------------


def test_url_forms() -> None:
    assert parse_url("sqlite:///data/gateway.db") == Path("data/gateway.db")
    assert parse_url("sqlite:////var/lib/gateway.db") == Path("/var/lib/gateway.db")
    for bad in ("postgresql://h/db", "sqlite://host/x.db", "sqlite:///", "sqlite:///dir/"):
        with pytest.raises(ValueError, match="sqlite:///"):
            parse_url(bad)


def test_connect_creates_migrates_and_uses_wal(url: str, tmp_path: Path) -> None:
    with open_ledger(url) as conn:
        assert schema_version(conn) == SCHEMA_VERSION
        with closing(conn.execute("PRAGMA journal_mode")) as cursor:
            assert cursor.fetchone()[0] == "wal"
        with closing(conn.execute("PRAGMA busy_timeout")) as cursor:
            assert cursor.fetchone()[0] >= 1000
    assert (tmp_path / "ledger.db").exists()
    with open_ledger(url) as conn:  # a second open applies nothing twice
        assert schema_version(conn) == SCHEMA_VERSION
        with closing(conn.execute("SELECT COUNT(*) FROM schema_version")) as cursor:
            assert cursor.fetchone()[0] == SCHEMA_VERSION


def test_relative_url_resolves_against_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with open_ledger("sqlite:///nested/dir/ledger.db"):
        pass
    assert (tmp_path / "nested" / "dir" / "ledger.db").exists()


def test_a_newer_schema_is_refused(url: str) -> None:
    with open_ledger(url) as conn:
        conn.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(LedgerError, match="newer"):
        connect(url)


# --- tenants --------------------------------------------------------------------------------------


def test_tenants_are_created_listed_and_found(conn: Connection) -> None:
    beta = create_tenant(conn, "beta.labs")
    acme = create_tenant(conn, "acme")
    assert acme.id.startswith("ten_")
    assert not acme.disabled
    assert list_tenants(conn) == [acme, beta]
    assert get_tenant_by_name_or_id(conn, "acme") == acme
    assert get_tenant_by_name_or_id(conn, beta.id) == beta
    with pytest.raises(NotFoundError, match="nobody"):
        get_tenant_by_name_or_id(conn, "nobody")


def test_tenant_names_are_unique_and_well_formed(conn: Connection) -> None:
    create_tenant(conn, "acme")
    with pytest.raises(ConflictError, match="already exists"):
        create_tenant(conn, "acme")
    for bad in ("", "-acme", "has space", "x" * 65, "ten_0123456789ab"):
        with pytest.raises(LedgerError, match="invalid tenant name"):
            create_tenant(conn, bad)
    assert [t.name for t in list_tenants(conn)] == ["acme"]


def test_tenants_can_be_disabled_and_enabled(conn: Connection) -> None:
    acme = create_tenant(conn, "acme")
    assert set_tenant_disabled(conn, acme.id, True).disabled
    assert not set_tenant_disabled(conn, acme.id, False).disabled
    with pytest.raises(NotFoundError):
        set_tenant_disabled(conn, "ten_000000000000", True)


# --- keys -----------------------------------------------------------------------------------------


def test_created_key_is_returned_once_and_stored_hashed(conn: Connection) -> None:
    acme = create_tenant(conn, "acme")
    created = create_key(conn, "acme", name="ci")
    assert created.key.startswith("tg-")
    assert created.key not in repr(created)
    record = created.record
    assert (record.tenant_id, record.tenant_name, record.name) == (acme.id, "acme", "ci")
    assert record.prefix == created.key[:10]
    assert not record.revoked
    with closing(conn.execute("SELECT hash FROM api_keys WHERE id = ?", (record.id,))) as cursor:
        assert cursor.fetchone()[0] == hash_key(created.key)
    with closing(conn.execute("SELECT * FROM api_keys")) as cursor:
        assert created.key not in json.dumps(cursor.fetchall())


def test_key_for_an_unknown_tenant_is_refused(conn: Connection) -> None:
    with pytest.raises(NotFoundError):
        create_key(conn, "nobody")


def test_keys_are_listed_per_tenant(conn: Connection) -> None:
    acme = create_tenant(conn, "acme")
    beta = create_tenant(conn, "beta")
    a1 = create_key(conn, acme.id).record
    b1 = create_key(conn, beta.id).record
    a2 = create_key(conn, acme.id, name="second").record
    by_creation = sorted([a1, a2], key=lambda k: (k.created_at, k.id))
    assert list_keys(conn) == [*by_creation, b1]
    assert list_keys(conn, acme.id) == by_creation
    assert list_keys(conn, "ten_000000000000") == []


def test_revocation_is_recorded_once(conn: Connection) -> None:
    create_tenant(conn, "acme")
    key = create_key(conn, "acme").record
    revoked = revoke_key(conn, key.id)
    assert revoked.revoked
    assert revoked.revoked_at is not None
    assert revoke_key(conn, key.id).revoked_at == revoked.revoked_at
    assert get_key(conn, key.id) == revoked
    with pytest.raises(NotFoundError):
        revoke_key(conn, "key_000000000000")


def test_snapshot_holds_only_usable_keys(conn: Connection) -> None:
    acme = create_tenant(conn, "acme")
    beta = create_tenant(conn, "beta")
    kept = create_key(conn, acme.id)
    revoked = create_key(conn, acme.id)
    of_disabled = create_key(conn, beta.id)
    revoke_key(conn, revoked.record.id)
    set_tenant_disabled(conn, beta.id, True)
    assert active_key_snapshot(conn) == {
        "keys": [{"hash": hash_key(kept.key), "key_id": kept.record.id, "tenant_id": acme.id}]
    }
    set_tenant_disabled(conn, beta.id, False)
    snapshot = active_key_snapshot(conn)
    assert {entry["key_id"] for entry in snapshot["keys"]} == {
        kept.record.id,
        of_disabled.record.id,
    }
    assert [e["key_id"] for e in snapshot["keys"]] == sorted(e["key_id"] for e in snapshot["keys"])


# --- usage ----------------------------------------------------------------------------------------


def test_usage_insert_is_idempotent(conn: Connection) -> None:
    batch = [event() for _ in range(5)]
    assert insert_usage_events(conn, batch) == 5
    assert insert_usage_events(conn, batch) == 0
    assert insert_usage_events(conn, [*batch[:2], event()]) == 1
    assert insert_usage_events(conn, []) == 0
    assert count_events(conn) == 6


def test_same_events_from_concurrent_writers_are_stored_once(url: str) -> None:
    events = [event() for _ in range(300)]
    writers = 8
    inserted: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(writers)

    def write(offset: int) -> None:
        try:
            with open_ledger(url) as own:
                start.wait()
                # Every writer writes every event, in overlapping batches of 50.
                rotated = events[offset * 37 :] + events[: offset * 37]
                total = sum(
                    insert_usage_events(own, rotated[i : i + 50]) for i in range(0, 300, 50)
                )
            with lock:
                inserted.append(total)
        except BaseException as exc:  # reported by the main thread
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sum(inserted) == len(events)
    with open_ledger(url) as conn:
        assert count_events(conn) == len(events)
        with closing(conn.execute("SELECT COUNT(DISTINCT event_id) FROM usage_events")) as cur:
            assert cur.fetchone()[0] == len(events)


def test_usage_totals_per_tenant_and_model(conn: Connection) -> None:
    acme = create_tenant(conn, "acme")
    beta = create_tenant(conn, "beta")
    insert_usage_events(
        conn,
        [
            event(tenant_id=acme.id, prompt_tokens=10, cached_tokens=4, completion_tokens=5),
            event(tenant_id=acme.id, prompt_tokens=20, cached_tokens=0, completion_tokens=7),
            event(
                tenant_id=acme.id,
                status="cancelled",
                prompt_tokens=3,
                cached_tokens=0,
                completion_tokens=1,
            ),
            event(tenant_id=acme.id, model="other", prompt_tokens=1, completion_tokens=1),
            event(tenant_id=beta.id, prompt_tokens=100, cached_tokens=50, completion_tokens=9),
            event(tenant_id="ten_ffffffffffff", prompt_tokens=1, completion_tokens=1),
        ],
    )
    totals = {(t.tenant_name, t.model): t for t in usage_totals(conn)}
    assert set(totals) == {
        ("acme", "sim-model"),
        ("acme", "other"),
        ("beta", "sim-model"),
        (None, "sim-model"),
    }
    acme_sim = totals["acme", "sim-model"]
    assert (acme_sim.requests, acme_sim.prompt_tokens, acme_sim.cached_tokens) == (3, 33, 4)
    assert acme_sim.completion_tokens == 13
    assert acme_sim.status is None
    assert totals[None, "sim-model"].tenant_id == "ten_ffffffffffff"

    only_beta = usage_totals(conn, beta.id)
    assert [(t.tenant_id, t.requests, t.prompt_tokens) for t in only_beta] == [(beta.id, 1, 100)]

    by_status = {
        (t.model, t.status): (t.requests, t.completion_tokens)
        for t in usage_totals(conn, acme.id, by_status=True)
    }
    assert by_status == {
        ("sim-model", "completed"): (2, 12),
        ("sim-model", "cancelled"): (1, 1),
        ("other", "completed"): (1, 1),
    }


def test_usage_totals_of_an_empty_ledger(conn: Connection) -> None:
    assert usage_totals(conn) == []


def test_connections_can_be_closed_after_errors(url: str) -> None:
    with pytest.raises(sqlite3.OperationalError), open_ledger(url) as conn:
        conn.execute("SELECT * FROM no_such_table")

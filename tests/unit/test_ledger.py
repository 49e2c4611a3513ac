"""The ledger on both backends, a real SQLite file and a real PostgreSQL database: schema,
transactions, tenants, keys, the key snapshot, usage events."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.keys import hash_key
from gateway.ledger.apikeys import active_key_snapshot, create_key, get_key, list_keys, revoke_key
from gateway.ledger.db import (
    SCHEMA_VERSION,
    ConflictError,
    Connection,
    DatabaseError,
    IntegrityError,
    LedgerError,
    NotFoundError,
    connect,
    execute,
    migrate,
    open_ledger,
    parse_url,
    query,
    schema_version,
    transaction,
)
from gateway.ledger.tenants import (
    create_tenant,
    get_tenant_by_name_or_id,
    list_tenants,
    set_tenant_disabled,
)
from gateway.ledger.usage import insert_usage_events, usage_totals
from tests.support import procs
from tests.support.events import usage_event as event
from tests.support.ledger_versions import downgrade
from tests.support.services.postgres import PostgresServer


def count_events(conn: Connection) -> int:
    return int(query(conn, "SELECT COUNT(*) FROM usage_events")[0][0])


def run_together(count: int, work: Callable[[int], int]) -> list[int]:
    """Runs `work(0)` ... `work(count - 1)` in as many threads, released at once; their results,
    or the first exception one of them raised."""
    results: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(count)

    def run(index: int) -> None:
        try:
            start.wait()
            result = work(index)
            with lock:
                results.append(result)
        except BaseException as exc:  # reported by the main thread
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# --- database -------------------------------------------------------------------------------------


def test_url_forms() -> None:
    assert parse_url("sqlite:///data/gateway.db") == Path("data/gateway.db")
    assert parse_url("sqlite:////var/lib/gateway.db") == Path("/var/lib/gateway.db")
    for url in (
        "postgresql://tg:secret@db.internal:5432/ledger",
        "postgres://tg@10.0.0.5/ledger?sslmode=require",
        "postgresql:///ledger?host=/run/postgresql",
    ):
        assert parse_url(url) == url
    for bad, problem in (
        ("sqlite://host/x.db", "unsupported"),
        ("sqlite:///", "must name a file"),
        ("sqlite:///dir/", "must name a file"),
        ("mysql://tg:secret@h/ledger", "unsupported"),
        ("postgresql://tg:secret@h:5432/", "must name a database"),
        ("postgresql://tg:secret@h:port/ledger", "invalid port"),
        ("postgresql://tg:secret@h/ledger?no_such_option=1", "invalid PostgreSQL URL"),
    ):
        with pytest.raises(ValueError, match=problem) as raised:
            parse_url(bad)
        assert "secret" not in str(raised.value)


def test_connect_creates_and_migrates_once(ledger_url: str) -> None:
    with open_ledger(ledger_url) as conn:
        assert schema_version(conn) == SCHEMA_VERSION
    with open_ledger(ledger_url) as conn:  # a second open applies nothing twice
        assert schema_version(conn) == SCHEMA_VERSION
        assert query(conn, "SELECT version FROM schema_version ORDER BY version") == [
            (version,) for version in range(1, SCHEMA_VERSION + 1)
        ]


def test_sqlite_ledger_uses_wal_and_waits_for_locks(tmp_path: Path) -> None:
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as conn:
        assert conn.dialect == "sqlite"
        assert query(conn, "PRAGMA journal_mode") == [("wal",)]
        assert query(conn, "PRAGMA busy_timeout")[0][0] >= 1000
    assert (tmp_path / "ledger.db").exists()


def test_postgres_ledger_waits_for_locks(postgres: PostgresServer) -> None:
    with postgres.database() as url, open_ledger(url) as conn:
        assert conn.dialect == "postgresql"
        assert query(conn, "SHOW lock_timeout") == [("10s",)]
        assert query(conn, "SHOW transaction_isolation") == [("read committed",)]


def test_a_postgres_connection_comes_back_after_the_server_drops_it(
    postgres: PostgresServer,
) -> None:
    with postgres.database() as url, open_ledger(url) as conn:
        create_tenant(conn, "acme")
        (backend,) = query(conn, "SELECT pg_backend_pid()")[0]
        postgres.cut_connections(url)
        with pytest.raises(DatabaseError):  # the statement that meets the break
            list_tenants(conn)
        assert [tenant.name for tenant in list_tenants(conn)] == ["acme"]
        assert query(conn, "SELECT pg_backend_pid()") != [(backend,)]
        assert query(conn, "SHOW lock_timeout") == [("10s",)]

        def cut_in_a_transaction() -> None:
            with transaction(conn):
                execute(conn, "DELETE FROM tenants")
                postgres.cut_connections(url)
                execute(conn, "DELETE FROM api_keys")

        with pytest.raises(DatabaseError):
            cut_in_a_transaction()
        assert [tenant.name for tenant in list_tenants(conn)] == ["acme"]  # rolled back
        assert create_tenant(conn, "beta").name == "beta"


def test_an_unreachable_postgres_is_a_database_error() -> None:
    url = f"postgresql://tg:secret@127.0.0.1:{procs.free_port()}/ledger?connect_timeout=5"
    with pytest.raises(DatabaseError, match=r"127\.0\.0\.1"):
        connect(url)


def test_relative_url_resolves_against_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with open_ledger("sqlite:///nested/dir/ledger.db"):
        pass
    assert (tmp_path / "nested" / "dir" / "ledger.db").exists()


def test_a_newer_schema_is_refused(ledger_url: str) -> None:
    with open_ledger(ledger_url) as conn:
        execute(conn, "INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(LedgerError, match="newer"):
        connect(ledger_url)


def test_concurrent_migrations_apply_each_migration_once(ledger_url: str) -> None:
    """Processes starting together against a new database: one applies every migration, the
    others wait for it and find the schema current."""

    def open_and_migrate(_: int) -> int:
        with open_ledger(ledger_url) as conn:  # `connect` migrates
            return migrate(conn)  # and again, now that another may have

    assert run_together(8, open_and_migrate) == [SCHEMA_VERSION] * 8
    with open_ledger(ledger_url) as conn:
        assert query(
            conn, "SELECT version, COUNT(*) FROM schema_version GROUP BY version ORDER BY version"
        ) == [(version, 1) for version in range(1, SCHEMA_VERSION + 1)]


def test_write_transactions_run_one_at_a_time(ledger_url: str) -> None:
    order: list[str] = []
    opened, go = threading.Event(), threading.Event()

    def other_writer() -> None:
        with open_ledger(ledger_url) as second:  # opening migrates, a write itself
            opened.set()
            go.wait()
            with transaction(second):
                order.append("second began")

    with open_ledger(ledger_url) as first:
        waiting = threading.Thread(target=other_writer)
        waiting.start()
        assert opened.wait(10)
        with transaction(first):
            go.set()
            time.sleep(0.3)  # the other writer is waiting for the write lock meanwhile
            order.append("first committed")
        waiting.join()
    assert order == ["first committed", "second began"]


def test_a_failed_transaction_rolls_back_and_the_connection_goes_on(ledger: Connection) -> None:
    def two_tenants_named_acme() -> None:
        with transaction(ledger):
            for tenant_id in ("ten_1", "ten_2"):
                execute(ledger, "INSERT INTO tenants VALUES (?, 'acme', 0, ?)", (tenant_id, False))

    def read_a_missing_table() -> None:
        with transaction(ledger):
            query(ledger, "SELECT * FROM no_such_table")

    with pytest.raises(IntegrityError):
        two_tenants_named_acme()
    assert list_tenants(ledger) == []
    with pytest.raises(DatabaseError):
        read_a_missing_table()
    assert create_tenant(ledger, "acme").name == "acme"


def test_placeholders_are_the_same_on_both_backends(ledger: Connection) -> None:
    # A `?` or `%` inside quotes is text, not a placeholder.
    assert query(ledger, "SELECT '100% sure?', ?, 'it''s ?'", ("yes",)) == [
        ("100% sure?", "yes", "it's ?")
    ]
    assert query(ledger, "SELECT ? || '%' WHERE 5 % 2 = ?", ("50", 1)) == [("50%",)]


# --- tenants --------------------------------------------------------------------------------------


def test_tenants_are_created_listed_and_found(ledger: Connection) -> None:
    beta = create_tenant(ledger, "beta.labs")
    acme = create_tenant(ledger, "acme")
    assert acme.id.startswith("ten_")
    assert not acme.disabled
    assert list_tenants(ledger) == [acme, beta]
    assert get_tenant_by_name_or_id(ledger, "acme") == acme
    assert get_tenant_by_name_or_id(ledger, beta.id) == beta
    with pytest.raises(NotFoundError, match="nobody"):
        get_tenant_by_name_or_id(ledger, "nobody")


def test_tenant_names_are_unique_and_well_formed(ledger: Connection) -> None:
    create_tenant(ledger, "acme")
    with pytest.raises(ConflictError, match="already exists"):
        create_tenant(ledger, "acme")
    for bad in ("", "-acme", "has space", "x" * 65, "ten_0123456789ab"):
        with pytest.raises(LedgerError, match="invalid tenant name"):
            create_tenant(ledger, bad)
    assert [t.name for t in list_tenants(ledger)] == ["acme"]


def test_tenants_can_be_disabled_and_enabled(ledger: Connection) -> None:
    acme = create_tenant(ledger, "acme")
    assert set_tenant_disabled(ledger, acme.id, True).disabled
    assert not set_tenant_disabled(ledger, acme.id, False).disabled
    with pytest.raises(NotFoundError):
        set_tenant_disabled(ledger, "ten_000000000000", True)


# --- keys -----------------------------------------------------------------------------------------


def test_created_key_is_returned_once_and_stored_hashed(ledger: Connection) -> None:
    acme = create_tenant(ledger, "acme")
    created = create_key(ledger, "acme", name="ci")
    assert created.key.startswith("tg-")
    assert created.key not in repr(created)
    record = created.record
    assert (record.tenant_id, record.tenant_name, record.name) == (acme.id, "acme", "ci")
    assert record.prefix == created.key[:10]
    assert not record.revoked
    assert query(ledger, "SELECT hash FROM api_keys WHERE id = ?", (record.id,)) == [
        (hash_key(created.key),)
    ]
    assert created.key not in json.dumps(query(ledger, "SELECT * FROM api_keys"))


def test_key_for_an_unknown_tenant_is_refused(ledger: Connection) -> None:
    with pytest.raises(NotFoundError):
        create_key(ledger, "nobody")


def test_keys_are_listed_per_tenant(ledger: Connection) -> None:
    acme = create_tenant(ledger, "acme")
    beta = create_tenant(ledger, "beta")
    a1 = create_key(ledger, acme.id).record
    b1 = create_key(ledger, beta.id).record
    a2 = create_key(ledger, acme.id, name="second").record
    by_creation = sorted([a1, a2], key=lambda k: (k.created_at, k.id))
    assert list_keys(ledger) == [*by_creation, b1]
    assert list_keys(ledger, acme.id) == by_creation
    assert list_keys(ledger, "ten_000000000000") == []


def test_revocation_is_recorded_once(ledger: Connection) -> None:
    create_tenant(ledger, "acme")
    key = create_key(ledger, "acme").record
    revoked = revoke_key(ledger, key.id)
    assert revoked.revoked
    assert revoked.revoked_at is not None
    assert revoke_key(ledger, key.id).revoked_at == revoked.revoked_at
    assert get_key(ledger, key.id) == revoked
    with pytest.raises(NotFoundError):
        revoke_key(ledger, "key_000000000000")


def test_snapshot_holds_only_usable_keys(ledger: Connection) -> None:
    acme = create_tenant(ledger, "acme")
    beta = create_tenant(ledger, "beta")
    kept = create_key(ledger, acme.id)
    revoked = create_key(ledger, acme.id)
    of_disabled = create_key(ledger, beta.id)
    revoke_key(ledger, revoked.record.id)
    set_tenant_disabled(ledger, beta.id, True)
    assert active_key_snapshot(ledger) == {
        "keys": [{"hash": hash_key(kept.key), "key_id": kept.record.id, "tenant_id": acme.id}]
    }
    set_tenant_disabled(ledger, beta.id, False)
    snapshot = active_key_snapshot(ledger)
    assert {entry["key_id"] for entry in snapshot["keys"]} == {
        kept.record.id,
        of_disabled.record.id,
    }
    assert [e["key_id"] for e in snapshot["keys"]] == sorted(e["key_id"] for e in snapshot["keys"])


# --- usage ----------------------------------------------------------------------------------------


def test_the_same_event_id_with_another_payload_is_a_logged_conflict_never_an_overwrite(
    ledger: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    first = event(completion_tokens=5)
    assert insert_usage_events(ledger, [first]) == 1
    with caplog.at_level("ERROR", logger="gateway.ledger.usage"):
        assert insert_usage_events(ledger, [first]) == 0
        assert caplog.text == "", "the same payload again is no conflict"
        other = first._replace(completion_tokens=9, status="interrupted")
        assert insert_usage_events(ledger, [other, event()]) == 1
    assert "conflicts with the one stored (kept)" in caplog.text
    assert "completion_tokens: stored 5, new 9" in caplog.text
    assert "status: stored 'completed', new 'interrupted'" in caplog.text
    stored = query(
        ledger, "SELECT completion_tokens FROM usage_events WHERE event_id = ?", [first.event_id]
    )
    assert stored == [(5,)]


def test_usage_insert_is_idempotent(ledger: Connection) -> None:
    batch = [event() for _ in range(5)]
    assert insert_usage_events(ledger, batch) == 5
    assert insert_usage_events(ledger, batch) == 0
    assert insert_usage_events(ledger, [*batch[:2], event()]) == 1
    assert insert_usage_events(ledger, []) == 0
    assert count_events(ledger) == 6


def test_a_batch_that_fails_stores_none_of_its_events(ledger: Connection) -> None:
    batch = [event(), event(), event(model=None), event()]  # the third breaks NOT NULL
    with pytest.raises(IntegrityError):
        insert_usage_events(ledger, batch)
    assert count_events(ledger) == 0
    assert insert_usage_events(ledger, [batch[0], batch[1], batch[3]]) == 3


def test_same_events_from_concurrent_writers_are_stored_once(ledger_url: str) -> None:
    events = [event() for _ in range(300)]

    def write(offset: int) -> int:
        with open_ledger(ledger_url) as own:
            # Every writer writes every event, in overlapping batches of 50.
            rotated = events[offset * 37 :] + events[: offset * 37]
            return sum(insert_usage_events(own, rotated[i : i + 50]) for i in range(0, 300, 50))

    assert sum(run_together(8, write)) == len(events)
    with open_ledger(ledger_url) as conn:
        assert count_events(conn) == len(events)
        assert query(conn, "SELECT COUNT(DISTINCT event_id) FROM usage_events") == [(len(events),)]


def test_one_event_written_by_100_concurrent_writers_is_stored_once(ledger_url: str) -> None:
    """A retried batch, or two replicas handing in the same event: one row, and exactly one
    writer told it was new."""
    once = event()
    with open_ledger(ledger_url):  # created and migrated before the race
        pass

    def write(_: int) -> int:
        with open_ledger(ledger_url) as own:
            return insert_usage_events(own, [once])

    assert sorted(run_together(100, write)) == [0] * 99 + [1]
    with open_ledger(ledger_url) as conn:
        assert query(conn, "SELECT event_id, prompt_tokens, seq FROM usage_events") == [
            (once.event_id, once.prompt_tokens - once.cached_tokens, 1)
        ]


def test_a_version_8_ledger_keeps_every_event_when_seq_becomes_sqlite_s_rowid(
    ledger_url: str,
) -> None:
    """Migration 9 rebuilds SQLite's table with `seq` as its key: the same rows, the same
    uniqueness rules; PostgreSQL's table is left as it was."""
    columns = "event_id, request_id, tenant_id, key_id, model, worker, seq, cost_micros"
    with open_ledger(ledger_url) as old:
        downgrade(old, 8)
        insert_usage_events(
            old, [event(worker=None), *(event(tenant_id=f"t{i}") for i in range(5))]
        )
        before = query(old, f"SELECT {columns} FROM usage_events ORDER BY seq")
    with open_ledger(ledger_url) as conn:
        assert schema_version(conn) == SCHEMA_VERSION
        assert query(conn, f"SELECT {columns} FROM usage_events ORDER BY seq") == before
        if conn.dialect == "sqlite":
            assert query(conn, "SELECT rowid, seq FROM usage_events ORDER BY seq") == [
                (seq, seq) for seq in range(1, 7)
            ]
            indexes = {row[1] for row in query(conn, "PRAGMA index_list(usage_events)")}
            assert "usage_events_seq" not in indexes
            assert "usage_events_tenant_seq" in indexes
        tenant_rows = "SELECT seq FROM usage_events WHERE tenant_id = ? ORDER BY seq"
        assert query(conn, tenant_rows, ["t3"]) == [(5,)]
        copy = (
            "INSERT INTO usage_events (event_id, request_id, tenant_id, key_id, model, endpoint, "
            "stream, status, http_status, prompt_tokens, cached_tokens, completion_tokens, "
            "usage_source, started_at_ms, finished_at_ms, recorded_at_ms, seq) "
            "SELECT event_id, request_id, tenant_id, key_id, model, endpoint, stream, status, "
            "http_status, prompt_tokens, cached_tokens, completion_tokens, usage_source, "
            "started_at_ms, finished_at_ms, recorded_at_ms, 100 FROM usage_events WHERE seq = 1"
        )
        with pytest.raises(IntegrityError):  # an event id stays unique
            execute(conn, copy)
        fresh = [event(), event(), event()]
        assert insert_usage_events(conn, [*fresh, fresh[1]]) == 3
        assert query(conn, "SELECT MAX(seq), COUNT(*) FROM usage_events") == [(9, 9)]


def test_usage_totals_per_tenant_and_model(ledger: Connection) -> None:
    acme = create_tenant(ledger, "acme")
    beta = create_tenant(ledger, "beta")
    insert_usage_events(
        ledger,
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
    totals = {(t.tenant_name, t.model): t for t in usage_totals(ledger)}
    assert set(totals) == {
        ("acme", "sim-model"),
        ("acme", "other"),
        ("beta", "sim-model"),
        (None, "sim-model"),
    }
    acme_sim = totals["acme", "sim-model"]
    # Disjoint classes: the ledger's prompt tokens are those not served from cache.
    assert (acme_sim.requests, acme_sim.prompt_tokens, acme_sim.cached_tokens) == (3, 29, 4)
    assert acme_sim.completion_tokens == 13
    # Integers on both backends (PostgreSQL's SUM of BIGINT is NUMERIC).
    assert {type(value) for value in dataclasses.astuple(acme_sim)[4:]} == {int}
    # Events of a tenant the ledger does not know come first, on both backends.
    assert [t.tenant_name for t in usage_totals(ledger)] == [None, "acme", "acme", "beta"]
    assert acme_sim.status is None
    assert totals[None, "sim-model"].tenant_id == "ten_ffffffffffff"

    only_beta = usage_totals(ledger, beta.id)
    assert [(t.tenant_id, t.requests, t.prompt_tokens) for t in only_beta] == [(beta.id, 1, 50)]

    by_status = {
        (t.model, t.status): (t.requests, t.completion_tokens)
        for t in usage_totals(ledger, acme.id, by_status=True)
    }
    assert by_status == {
        ("sim-model", "completed"): (2, 12),
        ("sim-model", "cancelled"): (1, 1),
        ("other", "completed"): (1, 1),
    }


def test_usage_totals_of_an_empty_ledger(ledger: Connection) -> None:
    assert usage_totals(ledger) == []


def test_connections_can_be_closed_after_errors(ledger_url: str) -> None:
    with pytest.raises(DatabaseError), open_ledger(ledger_url) as conn:
        query(conn, "SELECT * FROM no_such_table")


def test_a_closed_connection_raises_database_errors(ledger_url: str) -> None:
    conn = connect(ledger_url)
    conn.close()
    with pytest.raises(DatabaseError):
        list_tenants(conn)

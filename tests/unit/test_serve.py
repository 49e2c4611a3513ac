"""The control-plane loops of `gateway serve`, driven against a fake core and a real ledger."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest

from gateway import serve
from gateway.admin import bind_admin
from gateway.config import AdminConfig, ControlConfig
from gateway.keys import hash_key
from gateway.ledger.apikeys import create_key, revoke_key
from gateway.ledger.db import Connection, DatabaseError, now_ms, open_ledger
from gateway.ledger.prices import set_price
from gateway.ledger.quotas import set_tenant_quota
from gateway.ledger.refusals import add_refusals, refusal_page
from gateway.ledger.tenants import create_tenant
from gateway.ledger.usage import UsageEvent, insert_usage_events, usage_totals
from gateway.ledger_writer import LedgerWriter
from gateway.quotas import Price, QuotaPolicy
from gateway.serve import SnapshotPusher, UsageCollector, seed_spent, supervise
from tests.support.events import usage_event as event


class FakeCore:
    """Stands in for `gateway._core.Gateway`: a usage queue and a record of snapshot pushes."""

    def __init__(self) -> None:
        self.queue: list[UsageEvent] = []
        self.refused: list[dict[str, Any]] = []
        self.pushed: list[dict[str, Any]] = []
        self.policies: list[dict[str, Any]] = []
        self.seeded: list[dict[str, Any]] = []
        self.calls: list[str] = []
        self.shutdown_grace: float | None = None
        self.events_at_shutdown: list[UsageEvent] = []
        # Events acknowledged: every seq below it.
        self.committed = 0
        self.next_seq = 0

    def set_keys(self, snapshot_json: str) -> int:
        snapshot: dict[str, Any] = json.loads(snapshot_json)
        self.pushed.append(snapshot)
        self.calls.append("set_keys")
        return len(snapshot["keys"])

    def set_policies(self, snapshot_json: str) -> int:
        snapshot: dict[str, Any] = json.loads(snapshot_json)
        self.policies.append(snapshot)
        self.calls.append("set_policies")
        return len(snapshot["tenants"]) + len(snapshot["keys"])

    def seed_spent(self, entries_json: str) -> int:
        entries: list[dict[str, Any]] = json.loads(entries_json)
        self.seeded.extend(entries)
        return len(entries)

    def drain_usage(self, max_events: int = 4096) -> tuple[list[UsageEvent], int | None]:
        taken, self.queue = self.queue[:max_events], self.queue[max_events:]
        self.next_seq += len(taken)
        return taken, self.next_seq - 1 if taken else None

    def usage_committed(self, seq: int) -> None:
        assert seq >= self.committed, "acknowledgements only move forward"
        self.committed = seq + 1

    def pending_usage(self) -> int:
        return len(self.queue)

    def drain_refusals(self) -> str:
        taken, self.refused = self.refused, []
        return json.dumps(taken)

    def drain(self) -> bool:
        self.calls.append("drain")
        return self.calls.count("drain") == 1

    def shutdown(self, grace_s: float) -> None:
        self.calls.append("shutdown")
        self.shutdown_grace = grace_s
        self.queue.extend(self.events_at_shutdown)


def completion_tokens(conn: Connection) -> tuple[int, int]:
    totals = usage_totals(conn)
    return sum(t.requests for t in totals), sum(t.completion_tokens for t in totals)


def test_keys_are_pushed_only_when_they_change(ledger: Connection) -> None:
    core = FakeCore()
    pusher = SnapshotPusher(ledger, core)
    assert pusher.refresh()
    assert core.pushed == [{"keys": []}]
    assert not pusher.refresh()
    create_tenant(ledger, "acme")
    key = create_key(ledger, "acme")
    assert pusher.refresh()
    assert [e["hash"] for e in core.pushed[-1]["keys"]] == [hash_key(key.key)]
    assert not pusher.refresh()
    revoke_key(ledger, key.record.id)
    assert pusher.refresh()
    assert core.pushed[-1] == {"keys": []}
    assert len(core.pushed) == 3


def test_policies_are_pushed_before_keys_and_each_only_when_it_changes(
    ledger: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = FakeCore()
    pusher = SnapshotPusher(ledger, core)
    assert pusher.refresh()
    assert core.calls == ["set_policies", "set_keys"]
    assert core.policies == [{"tenants": {}, "keys": {}, "prices": {}}]
    assert not pusher.refresh()

    tenant = create_tenant(ledger, "acme")
    set_tenant_quota(ledger, "acme", QuotaPolicy(max_concurrent=3))
    assert pusher.refresh()
    assert core.calls[2:] == ["set_policies"]  # the keys did not change
    assert core.policies[-1]["tenants"] == {tenant.id: QuotaPolicy(max_concurrent=3).limits()}

    # A price scheduled for later is pushed once its time has come, with nothing else changed.
    start = now_ms()
    price = Price(prompt_per_mtok=1, cached_per_mtok=2, completion_per_mtok=3)
    set_price(ledger, "m", price, effective_at=start + 60_000)
    assert not pusher.refresh()
    monkeypatch.setattr(serve, "now_ms", lambda: start + 60_000)
    assert pusher.refresh()
    assert core.policies[-1]["prices"] == {"m": {"prompt": 1, "cached": 2, "completion": 3}}
    assert core.calls[3:] == ["set_policies"]


def test_seed_spent_hands_the_current_periods_to_the_core(ledger: Connection) -> None:
    insert_usage_events(ledger, [event(started_at_ms=now_ms()), event(started_at_ms=0)])
    core = FakeCore()
    assert seed_spent(ledger, core) == 4
    assert sorted((e["scope"], e["tenant_id"], e["period"], e["tokens"]) for e in core.seeded) == [
        ("key", "ten_000000000001", "day", 15),
        ("key", "ten_000000000001", "month", 15),
        ("tenant", "ten_000000000001", "day", 15),
        ("tenant", "ten_000000000001", "month", 15),
    ]


def test_collector_writes_batches_and_reports_how_many_came(ledger: Connection) -> None:
    core = FakeCore()
    core.queue = [event() for _ in range(5)]
    collector = UsageCollector(ledger, core, batch=2)
    assert [collector.flush() for _ in range(4)] == [2, 2, 1, 0]
    assert completion_tokens(ledger) == (5, 25)
    assert collector.recorded == 5
    assert core.committed == 5, "the core hears of every event the ledger took"


def test_collector_adds_refusal_counts_to_the_buckets_of_their_drain(
    ledger: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = FakeCore()
    refused = {"tenant_id": "ten_a", "key_id": "key_a", "reason": "rate_limit_exceeded"}
    core.refused = [
        {**refused, "count": 3},
        {**refused, "reason": "insufficient_quota", "count": 1},
    ]
    collector = UsageCollector(ledger, core, batch=10)

    def locked(conn: Connection, at_ms: int, refused: object) -> None:
        raise DatabaseError("database is locked")

    monkeypatch.setattr(serve, "add_refusals", locked)
    collector.flush()
    monkeypatch.setattr(serve, "add_refusals", add_refusals)
    core.refused = [{**refused, "count": 2}]
    collector.flush()
    start = now_ms() - 3_600_000
    page = refusal_page(ledger, "1h", start, now_ms() + 1, limit=2, group_by=["reason"])
    counts = {r.reason: r.requests for b in page.buckets for r in b.results}
    assert counts == {"rate_limit_exceeded": 5, "insufficient_quota": 1}, (
        "counts a failed write kept are written with the next"
    )
    assert collector.flush() == 0
    page = refusal_page(ledger, "1d", start, now_ms() + 1, limit=2, tenant_id="ten_b")
    assert all(not b.results for b in page.buckets), "a tenant's read holds only its own"


def test_collector_keeps_events_until_the_ledger_takes_them(
    ledger: Connection, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    core = FakeCore()
    core.queue = [event(), event()]
    collector = UsageCollector(ledger, core, batch=10)

    def locked(conn: Connection, events: Sequence[tuple[object, ...]]) -> int:
        raise DatabaseError("database is locked")

    monkeypatch.setattr(serve, "insert_usage_events", locked)
    with caplog.at_level(logging.ERROR, logger="gateway.serve"):
        assert collector.flush() == 2
    assert collector.unsaved == 2
    assert "will retry" in caplog.text
    assert completion_tokens(ledger) == (0, 0)
    assert core.committed == 0, "nothing is committed before the ledger has it"

    monkeypatch.setattr(serve, "insert_usage_events", insert_usage_events)
    core.queue = [event()]
    assert collector.flush() == 1
    assert collector.unsaved == 0
    assert completion_tokens(ledger) == (3, 15)


def test_the_usage_loop_calls_the_core_on_its_own_thread_and_writes_on_the_writers(
    ledger: Connection, usage_ledger: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer's idle-priority thread may be preempted at any moment: it must never hold a
    # lock the core's serving threads take, as the drain and the acknowledgement do.
    on: dict[str, set[int]] = {"drain": set(), "store": set(), "committed": set()}

    class Recording(FakeCore):
        def drain_usage(self, max_events: int = 4096) -> tuple[list[UsageEvent], int | None]:
            on["drain"].add(threading.get_native_id())
            return super().drain_usage(max_events)

        def usage_committed(self, seq: int) -> None:
            on["committed"].add(threading.get_native_id())
            super().usage_committed(seq)

    def store(conn: Connection, events: Sequence[UsageEvent]) -> int:
        on["store"].add(threading.get_native_id())
        return insert_usage_events(conn, events)

    monkeypatch.setattr(serve, "insert_usage_events", store)
    core = Recording()
    core.queue = [event() for _ in range(3)]
    collector = UsageCollector(usage_ledger, core, batch=10)
    writer = LedgerWriter()
    try:
        assert asyncio.run(collector.flush_on(writer)) == 3
    finally:
        writer.close()
    loop_thread = {threading.get_native_id()}
    assert on["drain"] == on["committed"] == loop_thread
    assert on["store"]
    assert not on["store"] & loop_thread
    assert completion_tokens(ledger) == (3, 15)
    assert core.committed == 3


@pytest.fixture
def usage_ledger(ledger_url: str) -> Iterator[Connection]:
    """The usage loop's own connection to the test's ledger, for the ledger writer's threads."""
    with open_ledger(ledger_url, any_thread=True) as conn:
        yield conn


def test_supervise_collects_while_serving_and_after_shutdown(
    ledger: Connection, usage_ledger: Connection
) -> None:
    create_tenant(ledger, "acme")
    key = create_key(ledger, "acme")
    core = FakeCore()
    core.events_at_shutdown = [event(completion_tokens=1000)]
    control = ControlConfig(key_refresh_ms=10, usage_flush_ms=10, usage_batch=3)

    async def scenario() -> int:
        stop = asyncio.Event()
        task = asyncio.create_task(
            supervise(core, ledger, control, 2.5, stop, usage_conn=usage_ledger)
        )
        core.queue.extend(event() for _ in range(10))
        # Written on the ledger writer's thread: the ledger itself says when.
        for _ in range(500):
            await asyncio.sleep(0.01)
            if completion_tokens(ledger) == (10, 50) and core.pushed:
                break
        assert not core.queue
        assert completion_tokens(ledger) == (10, 50)
        revoke_key(ledger, key.record.id)
        for _ in range(200):
            await asyncio.sleep(0.01)
            if core.pushed[-1] == {"keys": []}:
                break
        assert core.pushed[-1] == {"keys": []}
        stop.set()
        return await task

    assert asyncio.run(scenario()) == 0
    assert core.shutdown_grace == 2.5
    assert completion_tokens(ledger) == (11, 1050)


def test_supervise_turns_readiness_off_then_serves_the_drain_window_then_shuts_down(
    ledger: Connection, usage_ledger: Connection
) -> None:
    core = FakeCore()
    control = ControlConfig(key_refresh_ms=10, usage_flush_ms=10)

    async def scenario() -> int:
        stop = asyncio.Event()
        task = asyncio.create_task(
            supervise(core, ledger, control, 1.5, stop, usage_conn=usage_ledger, drain_s=0.05)
        )
        stop.set()
        # Within the window: the core is draining and not yet shut down.
        for _ in range(500):
            if "drain" in core.calls:
                break
            await asyncio.sleep(0)
        assert "shutdown" not in core.calls
        core.queue.append(event(completion_tokens=7))
        stop.set()  # a second signal changes nothing
        return await task

    assert asyncio.run(scenario()) == 0
    assert [c for c in core.calls if c in ("drain", "shutdown")] == ["drain", "shutdown"]
    assert core.shutdown_grace == 1.5
    assert completion_tokens(ledger) == (1, 7)


def test_supervise_serves_the_admin_api_until_stopped(
    ledger: Connection, usage_ledger: Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    core = FakeCore()
    control = ControlConfig(key_refresh_ms=10, usage_flush_ms=10)
    admin = bind_admin(ledger, AdminConfig(port=0), "secret")
    host, port = admin.address
    auth = {"authorization": "Bearer secret"}

    async def scenario() -> int:
        stop = asyncio.Event()
        task = asyncio.create_task(
            supervise(core, ledger, control, 0.0, stop, admin=admin, usage_conn=usage_ledger)
        )
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}/admin/v1") as client:
            created = await client.post("/tenants", json={"name": "acme"}, headers=auth)
            assert created.status_code == 201
            quota = {"max_concurrent": 2}
            assert (await client.put("/tenants/acme/quota", json=quota, headers=auth)).is_success
            for _ in range(200):
                if core.policies and core.policies[-1]["tenants"]:
                    break
                await asyncio.sleep(0.01)
            limits = core.policies[-1]["tenants"][created.json()["id"]]
            assert limits["max_concurrent"] == 2
            stop.set()
            return await task

    assert asyncio.run(scenario()) == 0
    assert f"admin API listening on http://127.0.0.1:{port}\n" in capsys.readouterr().out
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=2).close()

"""One usage event, one schema: the core's `UsageEvent` (whose field names are its serialised
form, the journal's), the control plane's `UsageEvent` the binding builds, the ledger's stored
event, the billing API's document and gRPC's `UsageEvent` carry every field under a declared
name, with its value and its type. A surface that drops, renames or retypes a field fails here.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import _core, cli
from gateway.billing import event_document
from gateway.config import GatewayConfig
from gateway.grpc import GatewayClient
from gateway.keys import hash_key
from gateway.ledger.apikeys import active_key_snapshot, create_key
from gateway.ledger.db import Connection
from gateway.ledger.prices import set_price
from gateway.ledger.tenants import create_tenant
from gateway.ledger.usage import StoredEvent, UsageEvent, events_after, insert_usage_events
from gateway.quotas import Price
from gateway.usage_reader import LedgerUsageReader
from tests.support import procs

# Where each field of the core's event is rendered: its name in the billing API's document (a
# dotted path for a nested member) and in gRPC's message; None where a surface withholds it, with
# the reason beside it. Every field of the core's event must be here.
RENDERED: dict[str, tuple[str, str | None]] = {
    "event_id": ("id", "id"),
    "request_id": ("request_id", "request_id"),
    # gRPC serves the caller's own tenant only: its id is the caller's.
    "tenant_id": ("tenant_id", None),
    "key_id": ("api_key_id", "api_key_id"),
    "model": ("model", "model"),
    # A worker's address is the fleet's insides: the billing API gives it to the operator only.
    "worker": ("worker", None),
    "endpoint": ("endpoint", "endpoint"),
    "stream": ("stream", "stream"),
    "status": ("status", "status"),
    "http_status": ("http_status", "http_status"),
    "prompt_tokens": ("usage.prompt_tokens", "tokens.prompt_tokens"),
    "cached_tokens": ("usage.cached_tokens", "tokens.cached_tokens"),
    "completion_tokens": ("usage.completion_tokens", "tokens.completion_tokens"),
    "usage_source": ("usage_source", "usage_source"),
    "started_at_ms": ("started_at_ms", "started_at_ms"),
    "finished_at_ms": ("finished_at_ms", "finished_at_ms"),
}

# What the ledger adds to an event when it prices and stores it, and where each surface has it.
PRICING: dict[str, tuple[str, str | None]] = {
    "recorded_at_ms": ("recorded_at_ms", "recorded_at_ms"),
    "price_effective_at": ("price_effective_at", "price_effective_at"),
    "cost_micros": ("cost_micros", "cost_micros"),
}

PRICE = Price(prompt_per_mtok=1_000_000, cached_per_mtok=500_000, completion_per_mtok=2_000_000)


def test_the_ledgers_event_has_the_cores_fields() -> None:
    assert sorted(UsageEvent._fields) == list(_core.USAGE_FIELDS)


def test_every_field_has_a_declared_rendering() -> None:
    assert sorted(RENDERED) == list(_core.USAGE_FIELDS)


def test_the_stored_event_keeps_every_field_with_its_type() -> None:
    event = typing.get_type_hints(UsageEvent)
    stored = typing.get_type_hints(StoredEvent)
    assert {name: stored.get(name) for name in event} == event


def path(document: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        document = document[part] if isinstance(document, dict) else getattr(document, part)
    return document


def distinct_event(tenant_id: str, key_id: str) -> UsageEvent:
    """An event whose every field has a value no other field has."""
    return UsageEvent(
        event_id="0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        request_id="contract-request",
        tenant_id=tenant_id,
        key_id=key_id,
        model="contract-model",
        worker="http://10.0.0.7:8000",
        endpoint="completions",
        stream=True,
        status="cancelled",
        http_status=499,
        prompt_tokens=1_000,
        cached_tokens=300,
        completion_tokens=77,
        usage_source="gateway",
        started_at_ms=1_767_225_600_123,
        finished_at_ms=1_767_225_600_456,
    )


@pytest.fixture
def stored(ledger: Connection) -> tuple[UsageEvent, StoredEvent, str]:
    """A priced event in a fresh ledger, as it went in and as the ledger stored it, and a key of
    its tenant."""
    tenant = create_tenant(ledger, "acme")
    key = create_key(ledger, "acme")
    set_price(ledger, "contract-model", PRICE, 1_767_225_600_000)
    event = distinct_event(tenant.id, key.record.id)
    assert insert_usage_events(ledger, [event]) == 1
    [row] = events_after(ledger, 0, 10)
    return event, row, key.key


def test_the_ledger_stores_every_field(stored: tuple[UsageEvent, StoredEvent, str]) -> None:
    event, row, _ = stored
    expected = event._asdict()
    # The ledger stores token classes disjoint: prompt tokens less the cached ones.
    expected["prompt_tokens"] = event.prompt_tokens - event.cached_tokens
    assert {name: getattr(row, name) for name in expected} == expected
    assert row.priced
    assert row.cost_micros is not None


def rendered_values(row: StoredEvent) -> dict[str, object]:
    """The stored event's fields, pricing included, by core name."""
    names = [*RENDERED, *PRICING]
    values = dataclasses.asdict(row)
    return {name: values[name] for name in names}


def test_the_billing_document_renders_every_field(
    stored: tuple[UsageEvent, StoredEvent, str],
) -> None:
    _, row, _ = stored
    document = json.loads(json.dumps(event_document(row, "USD")))
    for name, value in rendered_values(row).items():
        at, _ = RENDERED.get(name) or PRICING[name]
        assert path(document, at) == value, name
    tenant = event_document(row, "USD", tenant_view=True)
    assert tenant["worker"] is None
    assert {k: v for k, v in tenant.items() if k != "worker"} == {
        k: v for k, v in event_document(row, "USD").items() if k != "worker"
    }


@pytest.mark.e2e
def test_grpc_renders_every_field_the_billing_api_does(
    stored: tuple[UsageEvent, StoredEvent, str], ledger: Connection, ledger_url: str
) -> None:
    """Through the real path: the ledger, the control plane's reader, the core's usage service."""
    _, row, key = stored
    config = GatewayConfig.model_validate(
        {
            "workers": [{"url": "http://127.0.0.1:9"}],
            "server": {"host": "127.0.0.1", "port": 0},
            "grpc": {"host": "127.0.0.1", "port": 0},
            "journal": {"enabled": False},
            "storage": {"url": ledger_url},
        }
    )
    gateway = _core.Gateway(config.core_document())
    snapshot = active_key_snapshot(ledger)
    assert [k["hash"] for k in snapshot["keys"]] == [hash_key(key)]
    gateway.set_keys(json.dumps(snapshot))
    reader = LedgerUsageReader(ledger_url, "USD")
    gateway.set_usage_reader(reader)
    gateway.start()
    try:
        address = gateway.grpc_address()
        assert address is not None
        with GatewayClient(f"{address[0]}:{address[1]}", key, timeout=10) as client:
            page = client.usage_events(limit=10)
    finally:
        gateway.shutdown(1.0)
        reader.close()
    [message] = page.events
    for name, value in rendered_values(row).items():
        _, at = RENDERED.get(name) or PRICING[name]
        if at is None:
            continue
        if value is None:
            assert not message.HasField(at), name
        else:
            assert path(message, at) == value, name
    assert message.priced
    assert message.currency == "USD"
    withheld = {name for name, (_, at) in RENDERED.items() if at is None}
    assert withheld == {"tenant_id", "worker"}


@pytest.mark.e2e
def test_the_binding_hands_over_what_the_journal_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real request's event, drained through the binding, is field for field the journal's end
    record of it, under the same names: the binding and the journal serialise one type."""
    sim = procs.start_sim()
    journal = tmp_path / "journal"
    config = GatewayConfig.model_validate(
        {
            "workers": [{"url": sim.url}],
            "server": {"host": "127.0.0.1", "port": 0},
            "journal": {"dir": str(journal)},
        }
    )
    gateway = _core.Gateway(config.core_document())
    key = "tg-contract-key-0001"
    snapshot = {"keys": [{"hash": hash_key(key), "key_id": "key_1", "tenant_id": "ten_1"}]}
    gateway.set_keys(json.dumps(snapshot))
    try:
        host, port = gateway.start()
        response = httpx.post(
            f"http://{host}:{port}/v1/completions",
            headers={"authorization": f"Bearer {key}", "x-request-id": "contract-1"},
            json={"model": "sim-model", "prompt": "hi", "max_tokens": 3},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert procs.wait_for(lambda: gateway.pending_usage() == 1)
        [event], seq = gateway.drain_usage()
    finally:
        gateway.shutdown(1.0)
        sim.stop()
    lines, torn, unreadable = _core.journal_records(journal)
    assert (torn, unreadable) == (0, 0)
    records = [json.loads(line) for line in lines]
    [end] = [r for r in records if r["r"] == "end" and r["seq"] == seq]
    assert isinstance(event, UsageEvent)
    assert event._asdict() == {name: end[name] for name in _core.USAGE_FIELDS}
    assert set(end) - set(_core.USAGE_FIELDS) == {"r", "seq"}
    assert (event.request_id, event.status, event.completion_tokens) == (
        "contract-1",
        "completed",
        3,
    )
    # `gateway journal dump` prints those records, one a line.
    capsys.readouterr()
    assert cli.main(["journal", "dump", str(journal)]) == 0
    assert capsys.readouterr().out.splitlines() == lines

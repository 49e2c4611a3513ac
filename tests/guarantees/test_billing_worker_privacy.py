"""A tenant never sees the fleet's insides (guarantee 8): its own usage events, read with its API
key or through the gRPC usage service's reader, have `worker: null`; the billing and admin
tokens still see which worker served each event. Over real ledgers on both backends."""

from __future__ import annotations

import json

import pytest

from gateway.ledger.db import Connection
from gateway.usage_reader import LedgerUsageReader
from tests.support.billing_app import ADMIN, BILLING, Billing, Seeded

WORKERS = ("http://10.0.0.11:8000", "http://10.0.0.12:8000")


@pytest.fixture
def seeded(ledger: Connection) -> Seeded:
    seeded = Seeded(ledger)
    for worker in WORKERS:
        seeded.record(seeded.acme, 2, worker=worker)
    seeded.record(seeded.acme, 1, worker=None)
    return seeded


def workers(page: dict[str, object]) -> list[object]:
    data = page["data"]
    assert isinstance(data, list)
    assert len(data) == 5
    return [event["worker"] for event in data]


def test_a_tenant_key_sees_no_worker(seeded: Seeded) -> None:
    api = Billing(seeded.conn)
    assert workers(api.events(seeded.acme_key)) == [None] * 5
    assert workers(api.events(seeded.acme_key, tenant="acme")) == [None] * 5


def test_the_billing_and_admin_tokens_see_the_worker(seeded: Seeded) -> None:
    api = Billing(seeded.conn)
    served = [WORKERS[0]] * 2 + [WORKERS[1]] * 2 + [None]
    for token in (BILLING, ADMIN):
        assert workers(api.events(token)) == served
        assert workers(api.events(token, tenant="acme")) == served


def test_the_grpc_reader_gives_no_worker(seeded: Seeded, ledger_url: str) -> None:
    reader = LedgerUsageReader(ledger_url, "EUR")
    try:
        page = json.loads(reader(seeded.acme.id, None, 100))
    finally:
        reader.close()
    assert workers(page) == [None] * 5


def test_the_documented_schema_says_so(seeded: Seeded) -> None:
    schema = Billing(seeded.conn)("/v1/billing/openapi.json").json()
    worker = schema["components"]["schemas"]["UsageEventDocument"]["properties"]["worker"]
    assert "null for a tenant" in worker["description"]

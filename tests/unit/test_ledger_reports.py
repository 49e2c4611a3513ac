"""A million events of one micro-unit each, stored in a SQLite ledger and in a PostgreSQL one:
every report sums them exactly, and both backends give identical reports."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.ledger.db import Connection, open_ledger, query
from gateway.ledger.invoices import invoice, invoice_csv
from gateway.ledger.prices import set_price
from gateway.ledger.rollups import BUCKET_LIMITS, BUCKET_WIDTHS, GroupKey, usage_page
from gateway.ledger.usage import UsageEvent, events_after, insert_usage_events, usage_totals
from gateway.quotas import Price
from tests.support.services.postgres import PostgresServer

pytestmark = pytest.mark.e2e

EVENTS = 1_000_000
TENANTS = ("ten_00000000000a", "ten_00000000000b", "ten_00000000000c")
MAY = 1_714_521_600_000  # 2024-05-01T00:00:00Z
STEP_MS = 2_678_400_000 // EVENTS  # spread over May's 31 days


def events() -> Iterator[list[UsageEvent]]:
    """Batches of the million: one completion token each, at one micro-unit per token, except
    every 1000th event, of a model without a price."""
    batch: list[UsageEvent] = []
    for i in range(EVENTS):
        batch.append(
            UsageEvent(
                event_id=f"00000000-0000-7000-8000-{i:012d}",
                request_id=f"req-{i}",
                tenant_id=TENANTS[i % 3],
                key_id=f"key_00000000000{i % 5}",
                model="unpriced" if i % 1000 == 999 else ("m-small", "m-large")[i % 2],
                worker="http://127.0.0.1:8001",
                endpoint="completions",
                stream=bool(i % 2),
                status="completed",
                http_status=200,
                prompt_tokens=i % 7,
                cached_tokens=i % 7,
                completion_tokens=1,
                usage_source="worker",
                started_at_ms=MAY + i * STEP_MS,
                finished_at_ms=MAY + i * STEP_MS + 5,
            )
        )
        if len(batch) == 5000:
            yield batch
            batch = []


def fill(conn: Connection) -> None:
    # Prompt tokens are all cached here, and cached tokens are free: each event costs exactly its
    # one completion token, one micro-unit.
    one = Price(prompt_per_mtok=3_000_000, cached_per_mtok=0, completion_per_mtok=1_000_000)
    for model in ("m-small", "m-large"):
        set_price(conn, model, one, effective_at=0)
    for batch in events():
        insert_usage_events(conn, batch)


def reports(conn: Connection) -> dict[str, object]:
    """Every report the billing API serves, as plain values."""
    out: dict[str, object] = {
        "totals": [dataclasses.astuple(t) for t in usage_totals(conn, by_status=True)],
        "invoices": [
            (dataclasses.astuple(bill), invoice_csv(bill))
            for bill in (invoice(conn, tenant, "2024-05") for tenant in TENANTS)
        ],
    }
    for width in BUCKET_WIDTHS:
        limit = BUCKET_LIMITS[width][1]
        groups: tuple[tuple[GroupKey, ...], ...] = ((), ("tenant_id", "model"), ("api_key_id",))
        for group in groups:
            page = usage_page(
                conn, width, MAY, MAY + limit * BUCKET_WIDTHS[width], limit=limit, group_by=group
            )
            out[f"{width} {group}"] = dataclasses.astuple(page)
    first = events_after(conn, 0, 2000)
    last = events_after(conn, EVENTS - 2000, 2000)
    out["events"] = [dataclasses.replace(e, recorded_at_ms=0) for e in first + last]
    return out


@pytest.fixture(scope="module")
def both(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer
) -> Iterator[tuple[Connection, Connection]]:
    path: Path = tmp_path_factory.mktemp("million") / "ledger.db"
    with (
        open_ledger(f"sqlite:///{path}") as lite,
        postgres.database() as url,
        open_ledger(url) as pg,
    ):
        fill(lite)
        fill(pg)
        yield lite, pg


def test_a_million_one_micro_unit_events_sum_exactly(both: tuple[Connection, Connection]) -> None:
    priced = EVENTS - EVENTS // 1000
    for conn in both:
        assert query(conn, "SELECT COUNT(*), SUM(cost_micros) FROM usage_events") == [
            (EVENTS, priced)
        ]
        bills = [invoice(conn, tenant, "2024-05") for tenant in TENANTS]
        assert sum(bill.total_micros for bill in bills) == priced
        assert sum(bill.requests for bill in bills) == EVENTS
        assert sum(bill.unpriced_requests for bill in bills) == EVENTS // 1000
        for width in BUCKET_WIDTHS:
            assert query(
                conn,
                "SELECT SUM(requests), SUM(cost_micros), SUM(unpriced_requests) "
                "FROM usage_rollups WHERE bucket_width = ?",
                (width,),
            ) == [(EVENTS, priced, EVENTS // 1000)]
        month = usage_page(conn, "1d", MAY, MAY + 31 * 86_400_000, limit=31)
        assert sum(r.cost_micros for b in month.buckets for r in b.results) == priced
        assert sum(t.cost_micros for t in usage_totals(conn)) == priced


def test_sqlite_and_postgresql_give_identical_reports(
    both: tuple[Connection, Connection],
) -> None:
    lite, pg = both
    assert reports(lite) == reports(pg)

"""A PostgreSQL ledger used by real processes: the `gateway` CLI, and `gateway serve` replicas
metering into one shared database. (The ledger's own tests run on both backends elsewhere.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gateway.ledger.db import open_ledger
from gateway.ledger.tenants import get_tenant_by_name_or_id
from gateway.ledger.usage import insert_usage_events
from tests.support import procs
from tests.support.events import usage_event as event
from tests.support.services.postgres import PostgresServer
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

MODEL = "sim-model"


def test_cli_usage_reads_a_postgres_ledger(pg_url: str) -> None:
    assert "created tenant acme" in procs.cli("tenants", "create", "acme", "--db", pg_url)
    with open_ledger(pg_url) as conn:
        acme = get_tenant_by_name_or_id(conn, "acme").id
        insert_usage_events(
            conn,
            [
                event(tenant_id=acme, prompt_tokens=10, cached_tokens=2, completion_tokens=5),
                event(tenant_id=acme, prompt_tokens=20, cached_tokens=0, completion_tokens=7),
                event(
                    tenant_id=acme,
                    status="cancelled",
                    prompt_tokens=3,
                    cached_tokens=0,
                    completion_tokens=0,
                ),
            ],
        )
    totals = json.loads(procs.cli("usage", "--db", pg_url, "--json"))
    assert totals == [
        {
            "tenant_id": acme,
            "tenant_name": "acme",
            "model": MODEL,
            "requests": 3,
            "prompt_tokens": 31,
            "cached_tokens": 2,
            "completion_tokens": 12,
            "cost_micros": 0,
            "unpriced_requests": 3,
        }
    ]
    table = procs.cli("usage", "--db", pg_url, "--by-status").splitlines()
    assert [line.split() for line in table[1:]] == [
        ["acme", MODEL, "cancelled", "1", "3", "0", "0", "0", "1"],
        ["acme", MODEL, "completed", "2", "28", "2", "12", "0", "2"],
    ]


def test_cli_reports_an_unreachable_postgres_without_its_password() -> None:
    url = f"postgresql://tg:secret@127.0.0.1:{procs.free_port()}/ledger"
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "usage", "--db", url],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: database: ")
    assert "Connection refused" in done.stderr
    assert "secret" not in done.stderr


def test_serve_meters_into_postgres(make_stack: StackFactory, pg_url: str) -> None:
    stack = make_stack(n_sims=1, ledger=pg_url, itl_ms=1)
    response = stack.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "metered in postgres"}],
        max_tokens=5,
        extra_headers={"x-request-id": "pg-1"},
    )
    assert response.usage is not None
    assert procs.wait_for(lambda: len(procs.usage_rows(pg_url)) == 1)
    (row,) = procs.usage_rows(pg_url)
    assert (row["request_id"], row["key_id"], row["status"]) == ("pg-1", stack.key_id, "completed")
    assert row["stream"] is False
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        response.usage.prompt_tokens,
        response.usage.completion_tokens,
    )
    assert stack.gateway.stop() == 0, "".join(stack.gateway.output)


def test_replicas_share_one_postgres_ledger(make_stack: StackFactory, pg_url: str) -> None:
    replicas = [make_stack(n_sims=1, ledger=pg_url, itl_ms=1) for _ in range(2)]
    for replica in replicas:
        stream = replica.client().completions.create(
            model=MODEL, prompt="two replicas one ledger", max_tokens=3, stream=True
        )
        assert [chunk for chunk in stream]
    assert procs.wait_for(lambda: len(procs.usage_rows(pg_url)) == 2)
    rows = procs.usage_rows(pg_url)
    assert {row["key_id"] for row in rows} == {replica.key_id for replica in replicas}
    assert all(row["stream"] is True and row["status"] == "completed" for row in rows)
    for replica in replicas:
        assert replica.gateway.stop() == 0, "".join(replica.gateway.output)


def test_serve_meters_on_after_postgres_cuts_its_connection(
    make_stack: StackFactory, pg_url: str, postgres: PostgresServer
) -> None:
    """A PostgreSQL restart or a network cut: the events of that moment wait in the gateway and
    reach the ledger once it reconnects."""
    stack = make_stack(n_sims=1, ledger=pg_url, itl_ms=1)
    client = stack.client()

    def complete() -> None:
        client.completions.create(model=MODEL, prompt="through a cut", max_tokens=2)

    complete()
    assert procs.wait_for(lambda: len(procs.usage_rows(pg_url)) == 1)
    postgres.cut_connections(pg_url)
    for _ in range(3):
        complete()
    assert procs.wait_for(lambda: len(procs.usage_rows(pg_url)) == 4), "".join(stack.gateway.output)
    assert stack.gateway.stop() == 0, "".join(stack.gateway.output)

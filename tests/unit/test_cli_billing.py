"""`gateway invoice`, `gateway export` and the money columns of `gateway usage`, against a real
ledger on both backends."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.billing import EVENT_CSV_COLUMNS, UsageEventDocument
from gateway.cli_billing import EXPORT_PAGE
from gateway.ledger.db import open_ledger
from gateway.ledger.invoices import invoice, invoice_csv
from gateway.ledger.tenants import get_tenant_by_name_or_id
from gateway.ledger.usage import encode_cursor, insert_usage_events
from tests.support import procs
from tests.support.billing_app import JAN, PRICED, UNPRICED
from tests.support.cli_run import next_cursor, run
from tests.support.events import usage_event


class Ledger:
    """A ledger with tenants acme and beta and a price for `PRICED` from 2026-01-01."""

    def __init__(self, capsys: pytest.CaptureFixture[str], db: list[str]) -> None:
        self.db = db
        for name in ("acme", "beta"):
            assert run(capsys, "tenants", "create", name, *db)[0] == 0
        price = ["--prompt", "0.15", "--cached", "0.075", "--completion", "0.60"]
        when = ["--effective-at", "2026-01-01T00:00:00Z"]
        assert run(capsys, "prices", "set", PRICED, *price, *when, *db)[0] == 0
        with open_ledger(db[1]) as conn:
            self.ids = {name: get_tenant_by_name_or_id(conn, name).id for name in ("acme", "beta")}

    def record(self, tenant: str, count: int = 1, **fields: Any) -> list[str]:
        """Stores `count` events of `tenant` in one batch; returns their ids in order."""
        events = [
            usage_event(**{"tenant_id": self.ids[tenant], "started_at_ms": JAN} | fields)
            for _ in range(count)
        ]
        with open_ledger(self.db[1]) as conn:
            insert_usage_events(conn, events)
        return [event.event_id for event in events]


@pytest.fixture
def ledger(capsys: pytest.CaptureFixture[str], db: list[str]) -> Ledger:
    return Ledger(capsys, db)


def jsonl(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


# gateway invoice


def test_invoice_table_flags_unpriced_usage(
    capsys: pytest.CaptureFixture[str], ledger: Ledger
) -> None:
    ledger.record("acme", 2, model=PRICED, prompt_tokens=10, cached_tokens=2)
    ledger.record("acme", 1, model=UNPRICED, prompt_tokens=7, cached_tokens=0)
    code, out, _ = run(capsys, "invoice", "--tenant", "acme", "--period", "2026-01", *ledger.db)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"invoice of acme ({ledger.ids['acme']}) for 2026-01 (UTC), in USD"
    headers = "MODEL  PRICE FROM (UTC)  CLASS  TOKENS  PER 1M  AMOUNT"
    assert lines[1].split() == headers.split()
    assert [line.split() for line in lines[2:7]] == [
        [UNPRICED, "-", "prompt", "7", "-", "unpriced"],
        [UNPRICED, "-", "completion", "5", "-", "unpriced"],
        [PRICED, "2026-01-01", "00:00:00", "prompt", "16", "0.15", "0.000003"],
        [PRICED, "2026-01-01", "00:00:00", "cached", "4", "0.075", "0.000001"],
        [PRICED, "2026-01-01", "00:00:00", "completion", "10", "0.6", "0.000006"],
    ]
    assert lines[7:] == [
        "total 0.00001 USD for 3 requests",
        "not in the total: 1 request of a model that had no price",
    ]


def test_invoice_json_and_csv(
    capsys: pytest.CaptureFixture[str], ledger: Ledger, tmp_path: Path
) -> None:
    ledger.record("acme", 2, model=PRICED)
    ledger.record("acme", 1, model=UNPRICED)
    args = ("invoice", "--tenant", ledger.ids["acme"], "--period", "2026-01", *ledger.db)
    code, out, _ = run(capsys, *args, "--format", "json")
    assert code == 0
    document = json.loads(out)
    assert (document["object"], document["tenant_name"], document["currency"]) == (
        "billing.invoice",
        "acme",
        "USD",
    )
    assert (document["requests"], document["unpriced_requests"], document["unpriced"]) == (
        3,
        1,
        True,
    )
    assert document["total_micros"] == sum(line["amount_micros"] or 0 for line in document["lines"])
    with open_ledger(ledger.db[1]) as conn:
        expected = invoice_csv(invoice(conn, ledger.ids["acme"], "2026-01"))
    code, out, _ = run(capsys, *args, "--format", "csv")
    assert (code, out) == (0, expected)
    assert {row["model"] for row in csv.DictReader(io.StringIO(out))} == {PRICED, UNPRICED}


def test_invoice_states_the_configured_currency(
    capsys: pytest.CaptureFixture[str], ledger: Ledger, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[[workers]]\nurl = "http://127.0.0.1:8001"\n'
        f'[storage]\nurl = "{ledger.db[1]}"\n[billing]\ncurrency = "EUR"\n'
        f'[journal]\ndir = "{tmp_path / "journal"}"\n'
    )
    ledger.record("acme", model=PRICED)
    args = ("invoice", "--tenant", "acme", "--period", "2026-01", "--config", str(config))
    code, out, _ = run(capsys, *args)
    assert code == 0
    assert out.splitlines()[0].endswith("in EUR")
    assert json.loads(run(capsys, *args, "--format", "json")[1])["currency"] == "EUR"
    code, out, _ = run(capsys, "usage", "--config", str(config))
    assert out.split()[6:8] == ["COST", "(EUR)"]


def test_bad_invoice_arguments(capsys: pytest.CaptureFixture[str], ledger: Ledger) -> None:
    for period in ("2026-13", "January", "9999-12"):
        code, out, err = run(capsys, "invoice", "--tenant", "acme", "--period", period, *ledger.db)
        assert (code, out) == (2, "")
        assert "--period" in err
    code, _, err = run(capsys, "invoice", "--tenant", "nobody", "--period", "2026-01", *ledger.db)
    assert code == 1
    assert "nobody" in err
    assert run(capsys, "invoice", "--period", "2026-01", *ledger.db)[0] == 2


# gateway export


def test_export_jsonl_writes_every_event_in_commit_order(
    capsys: pytest.CaptureFixture[str], ledger: Ledger
) -> None:
    recorded = ledger.record("acme", 2) + ledger.record("beta", 1, model=UNPRICED)
    code, out, err = run(capsys, "export", "--format", "jsonl", *ledger.db)
    assert code == 0
    events = jsonl(out)
    assert [e["id"] for e in events] == recorded
    assert all(list(e) == list(UsageEventDocument.__annotations__) for e in events)
    assert [e["priced"] for e in events] == [True, True, False]
    assert next_cursor(err) == encode_cursor(3)


def test_export_resumes_from_its_cursor_exactly_once(
    capsys: pytest.CaptureFixture[str], ledger: Ledger
) -> None:
    recorded = ledger.record("acme", 5)
    code, out, err = run(capsys, "export", "--format", "jsonl", "--limit", "3", *ledger.db)
    assert code == 0
    first = [e["id"] for e in jsonl(out)]
    cursor = next_cursor(err)
    recorded += ledger.record("acme", 2)
    code, out, err = run(capsys, "export", "--format", "jsonl", "--after", cursor, *ledger.db)
    assert first + [e["id"] for e in jsonl(out)] == recorded
    # Nothing new: nothing written, the same cursor back.
    code, out, again = run(capsys, "export", "--after", next_cursor(err), *ledger.db)
    assert (code, out.splitlines()[1:], next_cursor(again)) == (0, [], next_cursor(err))


def test_export_of_one_tenant_in_csv(capsys: pytest.CaptureFixture[str], ledger: Ledger) -> None:
    ledger.record("acme", 2)
    beta = ledger.record("beta", 2, stream=False, worker=None)
    ledger.record("acme", 1)
    code, out, _ = run(capsys, "export", "--tenant", "beta", *ledger.db)
    assert code == 0
    reader = csv.DictReader(io.StringIO(out))
    assert tuple(reader.fieldnames or ()) == EVENT_CSV_COLUMNS
    rows = list(reader)
    assert [row["id"] for row in rows] == beta
    assert rows[0]["stream"] == "false"
    assert rows[0]["worker"] == ""
    assert (rows[0]["prompt_tokens"], rows[0]["cached_tokens"]) == ("8", "2")
    assert (rows[0]["priced"], rows[0]["currency"]) == ("true", "USD")


def test_export_pages_through_more_than_one_query(
    capsys: pytest.CaptureFixture[str], ledger: Ledger
) -> None:
    recorded = ledger.record("acme", 2 * EXPORT_PAGE + 1)
    _, out, _ = run(capsys, "export", "--format", "jsonl", *ledger.db)
    assert [e["id"] for e in jsonl(out)] == recorded
    limit = EXPORT_PAGE + 7
    _, out, err = run(capsys, "export", "--format", "jsonl", "--limit", str(limit), *ledger.db)
    assert [e["id"] for e in jsonl(out)] == recorded[:limit]
    assert next_cursor(err) == encode_cursor(limit)


def test_bad_export_arguments(capsys: pytest.CaptureFixture[str], ledger: Ledger) -> None:
    for args, option in ((("--after", "nope"), "--after"), (("--limit", "0"), "--limit")):
        code, out, err = run(capsys, "export", *args, *ledger.db)
        assert (code, out) == (2, "")
        assert option in err
    assert run(capsys, "export", "--tenant", "nobody", *ledger.db)[0] == 1


def test_export_as_a_process_to_a_file(ledger: Ledger, tmp_path: Path) -> None:
    recorded = ledger.record("acme", 3)
    out = procs.cli("export", "--format", "jsonl", *ledger.db)
    assert [e["id"] for e in jsonl(out)] == recorded


# gateway usage


def test_usage_shows_cost_and_unpriced_requests(
    capsys: pytest.CaptureFixture[str], ledger: Ledger
) -> None:
    ledger.record("acme", 2, model=PRICED)  # 5 micro-units each
    ledger.record("acme", 1, model=UNPRICED)
    ledger.record("beta", 3, model=PRICED, started_at_ms=0)  # before any price
    code, out, _ = run(capsys, "usage", *ledger.db)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[-4:] == ["COMPLETION", "COST", "(USD)", "UNPRICED"]
    assert [line.split()[:2] + line.split()[-2:] for line in lines[1:]] == [
        ["acme", UNPRICED, "0", "1"],
        ["acme", PRICED, "0.00001", "0"],
        ["beta", PRICED, "0", "3"],
    ]
    code, out, _ = run(capsys, "usage", "--json", "--tenant", "acme", *ledger.db)
    totals = {
        row["model"]: (row["cost_micros"], row["unpriced_requests"]) for row in json.loads(out)
    }
    assert totals == {PRICED: (10, 0), UNPRICED: (0, 1)}

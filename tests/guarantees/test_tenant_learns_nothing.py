"""Guarantee 8: a tenant learns nothing about other tenants or the fleet's insides: not their
data, not their volume (cursors are per tenant), not worker addresses.

- Not their data: a tenant reads its own events, and only its own, from a real `gateway serve`
  with its API key.
- Not their volume: every reader of one tenant's events (the billing API with the tenant's key or
  with a token and `tenant`, the gRPC usage service's reader, `gateway export --tenant`) pages by a
  cursor of that tenant's own events, which other tenants' traffic never moves.
- Not worker addresses: a tenant's own usage events, read with its API key or through the gRPC
  usage service's reader, have `worker: null`; the billing and admin tokens still see which worker
  served each event.

The last two in process, over real ledgers on both backends. (What a tenant's key may read on
each billing route: `tests/unit/test_billing_api.py`.)
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.ledger.db import Connection, open_ledger
from gateway.ledger.usage import TENANT_CURSOR_START, encode_cursor
from gateway.usage_reader import LedgerUsageReader
from tests.support import procs
from tests.support.billing_app import ADMIN, BILLING, Billing, Seeded, ids
from tests.support.cli_run import next_cursor, run
from tests.support.openai_errors import error

# --- Not their data -------------------------------------------------------------------------------

BILLING_LISTENING = r"admin API listening on (http://\S+)"


@pytest.mark.e2e
def test_a_tenant_reads_its_own_events_from_a_real_gateway(tmp_path: Path) -> None:
    sim = procs.start_sim()
    db = tmp_path / "ledger.db"
    key, key_id = procs.create_key(db, "acme")
    other_key, _ = procs.create_key(db, "beta")
    config = procs.write_config(
        tmp_path / "gateway.toml",
        [sim.url],
        db,
        '[admin]\nport = 0\n[billing]\ncurrency = "EUR"\n',
    )
    env = {"TOKENGATE_BILLING_TOKEN": BILLING, "TOKENGATE_ADMIN_TOKEN": ""}
    gateway = procs.start(["serve", "--config", str(config)], env=env)
    try:
        url = procs.wait_line(gateway, BILLING_LISTENING).group(1)
        request_ids = []
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            for i in range(3):
                done = client.post(
                    "/v1/chat/completions",
                    json={"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"authorization": f"Bearer {key}", "x-request-id": f"e2e-{i}"},
                )
                assert done.status_code == 200, done.text
                request_ids.append(done.headers["x-request-id"])

        with httpx.Client(base_url=f"{url}/v1/billing", timeout=10) as billing:

            def events(token: str, **params: Any) -> dict[str, Any]:
                response = billing.get(
                    "/usage-events", params=params, headers={"authorization": f"Bearer {token}"}
                )
                assert response.status_code == 200, response.text
                page: dict[str, Any] = response.json()
                return page

            assert procs.wait_for(lambda: len(events(key)["data"]) == 3)
            first = events(key, limit=2)
            rest = events(key, after=first["next_cursor"])
            assert (first["has_more"], rest["has_more"]) == (True, False)
            seen = first["data"] + rest["data"]
            assert [e["request_id"] for e in seen] == request_ids
            assert {(e["api_key_id"], e["currency"], e["priced"]) for e in seen} == {
                (key_id, "EUR", False)
            }
            assert all(e["usage"]["completion_tokens"] > 0 for e in seen)
            assert events(other_key)["data"] == []
            # A tenant never sees a worker's address; the billing token does.
            assert {e["worker"] for e in seen} == {None}
            everyone = events(BILLING)["data"]
            assert [e["worker"] for e in everyone] == [sim.url] * 3
            denied = billing.get(
                "/usage-events",
                params={"tenant": "beta"},
                headers={"authorization": f"Bearer {key}"},
            )
            assert denied.json()["error"]["code"] == "permission_denied"
            # Only the billing token is set: the admin routes are closed.
            closed = httpx.get(
                f"{url}/admin/v1/tenants", headers={"authorization": f"Bearer {BILLING}"}
            )
            assert closed.status_code == 401
        assert gateway.stop() == 0
    finally:
        gateway.stop()
        sim.stop()


# --- Not their volume: a tenant's cursor is its own -----------------------------------------------

EVENTS = "/v1/billing/usage-events"


def follow(api: Billing, token: str, limit: int, cursor: str | None = None, **params: Any) -> Any:
    """Pages to the end from `cursor`: (ids seen, the cursor of every page)."""
    seen: list[str] = []
    cursors: list[str] = []
    while True:
        page = api.events(token, limit=limit, **params, **({"after": cursor} if cursor else {}))
        seen += ids(page)
        cursor = page["next_cursor"]
        cursors.append(cursor)
        if not page["has_more"]:
            return seen, cursors


def test_a_tenants_cursors_are_the_same_whatever_other_tenants_do(
    ledger: Connection, tmp_path: Path
) -> None:
    """The same events of acme in two ledgers, one where beta has traffic in between and one
    where it has none: acme reads the same pages, the same cursors, in both."""
    busy = Seeded(ledger)
    with open_ledger(f"sqlite:///{tmp_path / 'quiet.db'}") as quiet_conn:
        quiet = Seeded(quiet_conn)
        acme_ids: list[str] = []
        for round_ in range(4):
            batch = [f"0194f0c2-0000-7000-8000-{round_:06d}{i:06d}" for i in range(3)]
            acme_ids += batch
            for seeded in (busy, quiet):
                for event_id in batch:
                    seeded.record(seeded.acme, event_id=event_id)
            busy.record(busy.beta, 5 * (round_ + 1))
        views = []
        for seeded in (busy, quiet):
            api = Billing(seeded.conn)
            by_key = follow(api, seeded.acme_key, 2)
            by_token = follow(api, BILLING, 2, tenant="acme")
            assert by_key == by_token  # the key's and the token's reads of acme: one kind
            views.append(by_key)
        assert views[0] == views[1]
        seen, cursors = views[0]
        assert seen == acme_ids
        # Nothing in a cursor counts events: the global cursors of the two ledgers do differ.
        assert (
            Billing(busy.conn).events()["next_cursor"]
            != (Billing(quiet.conn).events()["next_cursor"])
        )
        assert all(cursor.startswith("evt1.") for cursor in cursors)


def test_polling_a_tenant_cursor_does_not_move_with_other_tenants_traffic(
    api: Billing, seeded: Seeded
) -> None:
    mine = seeded.record(seeded.acme, 2)
    page = api.events(seeded.acme_key)
    assert ids(page) == mine
    cursor = page["next_cursor"]
    for _ in range(3):
        seeded.record(seeded.beta, 4)
        idle = api.events(seeded.acme_key, after=cursor)
        assert (idle["data"], idle["has_more"], idle["next_cursor"]) == ([], False, cursor)
    later = seeded.record(seeded.acme)
    moved = api.events(seeded.acme_key, after=cursor)
    assert ids(moved) == later
    assert moved["next_cursor"] != cursor


def test_a_tenant_with_no_events_has_the_fixed_beginning_cursor(
    api: Billing, seeded: Seeded
) -> None:
    seeded.record(seeded.beta, 3)
    first = api.events(seeded.acme_key)
    assert (first["data"], first["has_more"], first["next_cursor"]) == (
        [],
        False,
        TENANT_CURSOR_START,
    )
    assert api.events(BILLING, tenant="acme")["next_cursor"] == TENANT_CURSOR_START
    again = api.events(seeded.acme_key, after=TENANT_CURSOR_START)
    assert again["next_cursor"] == TENANT_CURSOR_START
    mine = seeded.record(seeded.acme, 2)
    assert ids(api.events(seeded.acme_key, after=TENANT_CURSOR_START)) == mine


def test_a_tenant_cursor_holds_only_the_tenants_own_last_event_id(
    api: Billing, seeded: Seeded
) -> None:
    seeded.record(seeded.beta, 7)
    mine = seeded.record(seeded.acme, 3)
    cursor = api.events(seeded.acme_key, limit=2)["next_cursor"]
    body = cursor.removeprefix("evt1.")
    assert base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode() == mine[1]


def _refused(api: Billing, token: str, after: str, **params: Any) -> str:
    details = error(api(EVENTS, token, params={"after": after, **params}), 400)
    assert (details["type"], details["param"]) == ("invalid_request_error", "after")
    message: str = details["message"]
    return message


def test_a_cursor_of_the_other_kind_or_of_another_tenant_is_400(
    api: Billing, seeded: Seeded
) -> None:
    seeded.record(seeded.acme, 2)
    seeded.record(seeded.beta, 2)
    global_cursor = api.events(limit=1)["next_cursor"]
    acme_cursor = api.events(seeded.acme_key, limit=1)["next_cursor"]
    beta_cursor = api.events(seeded.beta_key, limit=1)["next_cursor"]
    # A global cursor on a tenant's read, and a tenant's cursor on a read of every tenant.
    for token, params in ((seeded.acme_key, {}), (BILLING, {"tenant": "acme"})):
        for cursor in (global_cursor, encode_cursor(0)):
            assert "cursor of every tenant's events" in _refused(api, token, cursor, **params)
    for token in (BILLING, ADMIN):
        for cursor in (acme_cursor, TENANT_CURSOR_START):
            assert "cursor of one tenant's events" in _refused(api, token, cursor)
    # Another tenant's cursor is refused as one of no event at all: no oracle for event ids.
    unknown = "evt1." + base64.urlsafe_b64encode(b"0194f0c2-no-such-event").decode().rstrip("=")
    others = _refused(api, seeded.acme_key, beta_cursor)
    nobodys = _refused(api, seeded.acme_key, unknown)
    assert others.replace(beta_cursor, "X") == nobodys.replace(unknown, "X")
    assert _refused(api, BILLING, beta_cursor, tenant="acme") == others
    # Still fine for its own tenant.
    assert api.events(seeded.beta_key, after=beta_cursor)["data"]


@pytest.mark.parametrize(
    "after",
    [
        "evt1.",
        "evt1.!!!!",
        "evt1.start=",
        "evt1." + base64.urlsafe_b64encode(b"id\x00nul").decode().rstrip("="),
        "evt1." + base64.urlsafe_b64encode(b"\xff\xfe").decode().rstrip("="),
        "evt1." + base64.urlsafe_b64encode(b"x" * 129).decode().rstrip("="),
        "evt1." + "A" * 600,
    ],
)
def test_a_malformed_tenant_cursor_is_400(api: Billing, seeded: Seeded, after: str) -> None:
    seeded.record(seeded.acme)
    _refused(api, seeded.acme_key, after)


def test_the_grpc_reader_pages_by_the_tenant_cursor(seeded: Seeded, ledger_url: str) -> None:
    mine = seeded.record(seeded.acme, 3)
    seeded.record(seeded.beta, 4)
    global_cursor = Billing(seeded.conn).events()["next_cursor"]
    reader = LedgerUsageReader(ledger_url, "EUR")
    try:
        first = json.loads(reader(seeded.acme.id, None, 2))
        rest = json.loads(reader(seeded.acme.id, first["next_cursor"], 2))
        assert ids(first) + ids(rest) == mine
        assert rest["has_more"] is False
        seeded.record(seeded.beta, 4)
        idle = json.loads(reader(seeded.acme.id, rest["next_cursor"], 2))
        assert (idle["data"], idle["next_cursor"]) == ([], rest["next_cursor"])
        with pytest.raises(ValueError, match="cursor of every tenant's events"):
            reader(seeded.acme.id, global_cursor, 2)
        with pytest.raises(ValueError, match="not a cursor of this tenant"):
            reader(seeded.beta.id, rest["next_cursor"], 2)
    finally:
        reader.close()


def test_export_of_one_tenant_resumes_by_its_tenant_cursor(
    capsys: pytest.CaptureFixture[str], seeded: Seeded, ledger_url: str
) -> None:
    mine = seeded.record(seeded.acme, 3)
    seeded.record(seeded.beta, 4)
    db = ("--db", ledger_url)
    export = ("export", "--format", "jsonl", "--tenant", "acme", *db)
    code, out, err = run(capsys, *export, "--limit", "2")
    assert code == 0
    assert [json.loads(line)["id"] for line in out.splitlines()] == mine[:2]
    cursor = next_cursor(err)
    assert cursor.startswith("evt1.")
    seeded.record(seeded.beta, 4)
    code, out, err = run(capsys, *export, "--after", cursor)
    assert [json.loads(line)["id"] for line in out.splitlines()] == mine[2:]
    last = next_cursor(err)
    # Nothing new of acme's, beta busy meanwhile: the same cursor back.
    seeded.record(seeded.beta, 2)
    code, out, err = run(capsys, *export, "--after", last)
    assert (code, out, next_cursor(err)) == (0, "", last)
    # The billing API gives acme the same cursor.
    assert Billing(seeded.conn).events(seeded.acme_key)["next_cursor"] == last
    # A tenant with nothing yet: the beginning cursor.
    assert run(capsys, "tenants", "create", "gamma", *db)[0] == 0
    code, out, err = run(capsys, "export", "--tenant", "gamma", *db)
    assert (code, next_cursor(err)) == (0, TENANT_CURSOR_START)
    # Either kind of cursor is refused by the other kind of export.
    for args in ((*export, "--after", encode_cursor(0)), ("export", "--after", last, *db)):
        code, out, err = run(capsys, *args)
        assert (code, out) == (2, "")
        assert "--after" in err


# --- Not worker addresses -------------------------------------------------------------------------

WORKERS = ("http://10.0.0.11:8000", "http://10.0.0.12:8000")


@pytest.fixture
def with_workers(ledger: Connection) -> Seeded:
    """Five events of acme: two served by each worker, one by none."""
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


def test_a_tenant_key_sees_no_worker(with_workers: Seeded) -> None:
    api = Billing(with_workers.conn)
    assert workers(api.events(with_workers.acme_key)) == [None] * 5
    assert workers(api.events(with_workers.acme_key, tenant="acme")) == [None] * 5


def test_the_billing_and_admin_tokens_see_the_worker(with_workers: Seeded) -> None:
    api = Billing(with_workers.conn)
    served = [WORKERS[0]] * 2 + [WORKERS[1]] * 2 + [None]
    for token in (BILLING, ADMIN):
        assert workers(api.events(token)) == served
        assert workers(api.events(token, tenant="acme")) == served


def test_the_grpc_reader_gives_no_worker(with_workers: Seeded, ledger_url: str) -> None:
    reader = LedgerUsageReader(ledger_url, "EUR")
    try:
        page = json.loads(reader(with_workers.acme.id, None, 100))
    finally:
        reader.close()
    assert workers(page) == [None] * 5


def test_the_documented_schema_says_so(with_workers: Seeded) -> None:
    schema = Billing(with_workers.conn)("/v1/billing/openapi.json").json()
    worker = schema["components"]["schemas"]["UsageEventDocument"]["properties"]["worker"]
    assert "null for a tenant" in worker["description"]

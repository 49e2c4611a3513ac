"""The billing API in-process (ASGI, no socket) over a real ledger on both backends: who may read
what, cursor paging, usage buckets, invoices. (A tenant reading its own events from a real
`gateway serve`: `tests/guarantees/test_tenant_learns_nothing.py`.)"""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest

from gateway.admin import create_app
from gateway.billing import UsageEventDocument
from gateway.ledger.apikeys import revoke_key
from gateway.ledger.db import Connection, now_ms
from gateway.ledger.invoices import invoice, invoice_csv
from gateway.ledger.tenants import set_tenant_disabled
from gateway.ledger.usage import encode_cursor, insert_usage_events
from tests.support.billing_app import (
    ADMIN,
    BILLING,
    JAN,
    PRICED,
    UNPRICED,
    Billing,
    Seeded,
    ids,
)
from tests.support.events import ms, usage_event
from tests.support.openai_errors import error

ROUTES = (
    "/v1/billing/usage-events",
    f"/v1/billing/usage?start_time={JAN // 1000}&end_time={JAN // 1000 + 1}",
    "/v1/billing/invoices?period=2026-01",
    f"/v1/billing/refusals?start_time={JAN // 1000}&end_time={JAN // 1000 + 1}",
    "/v1/billing/keys",
    "/v1/billing/quota",
    "/v1/billing/openapi.json",
    "/v1/billing/me",
)
# The routes that take a `tenant`.
TENANT_ROUTES = ROUTES[:6]


# Who may read what.


def test_the_billing_and_admin_tokens_read_every_tenant(api: Billing, seeded: Seeded) -> None:
    acme = seeded.record(seeded.acme, 2)
    beta = seeded.record(seeded.beta)
    for token in (BILLING, ADMIN):
        assert ids(api.events(token)) == acme + beta
        assert ids(api.events(token, tenant="beta")) == beta
        assert ids(api.events(token, tenant=seeded.acme.id)) == acme
    assert error(api("/v1/billing/usage-events?tenant=nobody"), 404)["code"] == "not_found"


def test_a_tenant_key_reads_its_own_tenant_only(api: Billing, seeded: Seeded) -> None:
    acme = seeded.record(seeded.acme, 2)
    seeded.record(seeded.beta)
    key = seeded.acme_key
    assert ids(api.events(key)) == acme
    assert ids(api.events(key, tenant="acme")) == acme
    assert ids(api.events(key, tenant=seeded.acme.id)) == acme
    usage = api(f"{ROUTES[1]}&group_by=tenant_id", key).json()
    assert {r["tenant_id"] for b in usage["data"] for r in b["results"]} == {seeded.acme.id}
    assert api("/v1/billing/invoices?period=2026-01", key).json()["tenant_id"] == seeded.acme.id
    # Another tenant, by name or id, or one that does not exist: refused alike.
    for other in ("beta", seeded.beta.id, "nobody"):
        for route in TENANT_ROUTES:
            details = error(api(f"{route}{'&' if '?' in route else '?'}tenant={other}", key), 403)
            assert (details["code"], details["param"]) == ("permission_denied", "tenant")


def test_missing_wrong_revoked_and_disabled_credentials_are_401(
    api: Billing, seeded: Seeded
) -> None:
    seeded.record(seeded.acme)
    revoke_key(seeded.conn, seeded.acme_key_id)
    set_tenant_disabled(seeded.conn, seeded.beta.id, True)
    for route in ROUTES:
        response = api(route, token=None)
        assert error(response, 401)["code"] == "missing_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
        basic = api(route, token=None, headers={"authorization": f"Basic {BILLING}"})
        assert error(basic, 401)["code"] == "missing_api_key"
        for token in (seeded.acme_key, seeded.beta_key, BILLING + "x", "tg-nope", "tøken"):
            assert error(api(route, token=token), 401)["code"] == "invalid_api_key", token
    set_tenant_disabled(seeded.conn, seeded.beta.id, False)
    assert api(ROUTES[0], token=seeded.beta_key).status_code == 200


def test_the_billing_token_opens_no_admin_route(api: Billing, seeded: Seeded) -> None:
    for token in (BILLING, seeded.acme_key):
        denied = api("/admin/v1/tenants", token=token)
        assert error(denied, 401)["code"] == "invalid_admin_token"
    assert api("/admin/v1/tenants", token=ADMIN).status_code == 200


def test_with_one_token_set_the_other_routes_answer_401(ledger: Connection) -> None:
    seeded = Seeded(ledger)
    seeded.record(seeded.acme)
    billing_only = Billing(ledger, admin=None)
    for token in (BILLING, "", "x"):
        assert error(billing_only("/admin/v1/tenants", token), 401)["code"] in (
            "invalid_admin_token",
            "missing_admin_token",
        )
    assert billing_only("/v1/billing/usage-events").status_code == 200
    admin_only = Billing(ledger, billing=None)
    assert error(admin_only("/v1/billing/usage-events", BILLING), 401)["code"] == (
        "invalid_api_key"
    )
    assert admin_only("/v1/billing/usage-events", ADMIN).status_code == 200
    assert admin_only("/v1/billing/usage-events", seeded.acme_key).status_code == 200
    assert admin_only("/admin/v1/tenants", ADMIN).status_code == 200
    with pytest.raises(ValueError, match="must not be empty"):
        create_app(ledger, None, "")


def test_the_openapi_documents_are_apart(api: Billing) -> None:
    billing = api("/v1/billing/openapi.json").json()
    assert billing["info"]["title"] == "tokengate billing API"
    assert set(billing["paths"]) == {
        "/v1/billing/usage-events",
        "/v1/billing/usage",
        "/v1/billing/invoices",
        "/v1/billing/refusals",
        "/v1/billing/me",
        "/v1/billing/keys",
        "/v1/billing/quota",
    }
    assert "BillingBearer" in billing["components"]["securitySchemes"]
    admin = api("/admin/v1/openapi.json", ADMIN).json()
    assert not any(path.startswith("/v1/billing") for path in admin["paths"])


# Usage events.


def test_an_event_as_the_api_shows_it(api: Billing, seeded: Seeded) -> None:
    (priced,) = seeded.record(
        seeded.acme, model=PRICED, prompt_tokens=10, cached_tokens=2, completion_tokens=5
    )
    (free,) = seeded.record(seeded.acme, model=UNPRICED, stream=False)
    first, second = api.events()["data"]
    assert first == {
        "id": priced,
        "object": "billing.usage_event",
        "request_id": "req-1",
        "tenant_id": seeded.acme.id,
        "api_key_id": seeded.acme_key_id,
        "model": PRICED,
        "worker": "http://127.0.0.1:8001",
        "endpoint": "chat.completions",
        "stream": True,
        "status": "completed",
        "http_status": 200,
        # Disjoint: 10 prompt tokens of which 2 came from the cache.
        "usage": {"prompt_tokens": 8, "cached_tokens": 2, "completion_tokens": 5},
        "usage_source": "worker",
        "started_at_ms": JAN,
        "finished_at_ms": 1_700_000_000_250,
        "recorded_at_ms": first["recorded_at_ms"],
        "price_effective_at": ms("2026-01-01T00:00:00"),
        # ceil((8 x 150,000 + 2 x 75,000 + 5 x 600,000) / 1,000,000) = ceil(4.35)
        "cost_micros": 5,
        "priced": True,
        "currency": "EUR",
    }
    assert abs(first["recorded_at_ms"] - now_ms()) < 60_000
    assert list(first) == list(UsageEventDocument.__annotations__)
    assert (second["id"], second["stream"], second["priced"]) == (free, False, False)
    assert (second["price_effective_at"], second["cost_micros"]) == (None, None)


def test_paging_by_cursor_sees_every_event_exactly_once(api: Billing, seeded: Seeded) -> None:
    recorded = seeded.record(seeded.acme, 5) + seeded.record(seeded.beta, 6)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = api.events(limit=4, **({"after": cursor} if cursor else {}))
        assert page["object"] == "list"
        assert len(page["data"]) <= 4
        seen += ids(page)
        cursor = page["next_cursor"]
        pages += 1
        if pages == 2:  # written while a consumer pages: seen once, after the others
            recorded += seeded.record(seeded.acme, 3)
        if not page["has_more"]:
            break
    assert seen == recorded
    assert pages == 4  # 14 events: 4 + 4 + 4 + 2
    # Polling with the last cursor: nothing new, the same cursor; then what was written since.
    idle = api.events(after=cursor)
    assert (idle["data"], idle["has_more"], idle["next_cursor"]) == ([], False, cursor)
    later = seeded.record(seeded.beta)
    assert ids(api.events(after=cursor)) == later


def test_has_more_is_false_on_an_exactly_full_last_page(api: Billing, seeded: Seeded) -> None:
    recorded = seeded.record(seeded.acme, 4)
    page = api.events(limit=4)
    assert (ids(page), page["has_more"]) == (recorded, False)
    assert page["next_cursor"] != encode_cursor(0)


def test_a_tenants_pages_skip_the_others_events(api: Billing, seeded: Seeded) -> None:
    acme = []
    for _ in range(3):
        acme += seeded.record(seeded.acme, 2)
        seeded.record(seeded.beta, 2)
    first = api.events(seeded.acme_key, limit=4)
    assert first["has_more"]
    rest = api.events(seeded.acme_key, limit=4, after=first["next_cursor"])
    assert (ids(first) + ids(rest), rest["has_more"]) == (acme, False)


def test_an_empty_ledger_gives_the_beginning_cursor(api: Billing) -> None:
    page = api.events()
    assert page == {
        "object": "list",
        "data": [],
        "has_more": False,
        "next_cursor": encode_cursor(0),
    }


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"after": "nope"}, "after"),
        ({"after": "evc1.!!"}, "after"),
        ({"after": encode_cursor(2**64 - 1)}, "after"),
        ({"limit": 0}, "limit"),
        ({"limit": 10_001}, "limit"),
        ({"limit": "ten"}, "limit"),
    ],
)
def test_bad_cursors_and_limits_are_400(api: Billing, params: dict[str, Any], param: str) -> None:
    details = error(api("/v1/billing/usage-events", params=params), 400)
    assert (details["type"], details["param"]) == ("invalid_request_error", param)


def test_the_largest_limit_is_accepted(api: Billing, seeded: Seeded) -> None:
    seeded.record(seeded.acme, 3)
    assert len(api.events(limit=10_000)["data"]) == 3


# Usage buckets.


def usage(api: Billing, token: str = BILLING, **params: Any) -> dict[str, Any]:
    response = api("/v1/billing/usage", token, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_usage_buckets_have_openais_shape(api: Billing, seeded: Seeded) -> None:
    seeded.record(seeded.acme, 2, model=PRICED, prompt_tokens=10, cached_tokens=2)
    seeded.record(
        seeded.beta, 1, model=UNPRICED, prompt_tokens=4, cached_tokens=0, status="interrupted"
    )
    hour = JAN // 1000
    body = usage(api, start_time=hour - 3600, end_time=hour + 3600, bucket_width="1h")
    assert body == {
        "object": "page",
        "data": [
            {"object": "bucket", "start_time": hour - 3600, "end_time": hour, "results": []},
            {
                "object": "bucket",
                "start_time": hour,
                "end_time": hour + 3600,
                "results": [
                    {
                        "object": "organization.usage.completions.result",
                        "input_tokens": 24,
                        "input_cached_tokens": 4,
                        "output_tokens": 15,
                        "num_model_requests": 3,
                        "tenant_id": None,
                        "api_key_id": None,
                        "model": None,
                        "cost_micros": 10,
                        "unpriced_requests": 1,
                        "failed_requests": 1,
                        "currency": "EUR",
                    }
                ],
            },
        ],
        "has_more": False,
        "next_page": None,
    }


def test_usage_groups_by_tenant_key_and_model(api: Billing, seeded: Seeded) -> None:
    seeded.record(seeded.acme, 2, model=PRICED)
    seeded.record(seeded.acme, 1, model=UNPRICED)
    seeded.record(seeded.beta, 1, model=PRICED)
    day: dict[str, Any] = {
        "start_time": JAN // 1000,
        "end_time": JAN // 1000 + 1,
        "bucket_width": "1d",
    }

    def groups(**params: Any) -> list[tuple[object, ...]]:
        (bucket,) = usage(api, **day, **params)["data"]
        return [
            (r["tenant_id"], r["api_key_id"], r["model"], r["num_model_requests"])
            for r in bucket["results"]
        ]

    acme, beta = seeded.acme.id, seeded.beta.id
    by_tenant_and_model = sorted(
        [(acme, None, PRICED, 2), (acme, None, UNPRICED, 1), (beta, None, PRICED, 1)]
    )
    assert groups(group_by="tenant_id,model") == by_tenant_and_model
    assert groups(group_by=["model", "tenant"]) == by_tenant_and_model
    assert groups(**{"group_by[]": ["tenant_id", "model"]}) == by_tenant_and_model
    assert groups(group_by="model") == [(None, None, UNPRICED, 1), (None, None, PRICED, 3)]
    assert groups(group_by="api_key_id") == sorted(
        [(None, seeded.acme_key_id, None, 3), (None, seeded.beta_key_id, None, 1)]
    )
    assert groups() == [(None, None, None, 4)]
    assert groups(tenant="beta", group_by="model") == [(None, None, PRICED, 1)]


def test_usage_pages_follow_next_page(api: Billing, seeded: Seeded) -> None:
    for hour in range(30):
        insert_usage_events(
            seeded.conn,
            [usage_event(tenant_id=seeded.acme.id, started_at_ms=JAN + hour * 3_600_000)],
        )
    query: dict[str, Any] = {
        "start_time": JAN // 1000,
        "end_time": JAN // 1000 + 30 * 3600,
        "bucket_width": "1h",
    }
    first = usage(api, **query)
    assert (len(first["data"]), first["has_more"]) == (24, True)
    second = usage(api, **query, page=first["next_page"])
    assert (len(second["data"]), second["has_more"], second["next_page"]) == (6, False, None)
    buckets = first["data"] + second["data"]
    assert [b["start_time"] for b in buckets] == [JAN // 1000 + h * 3600 for h in range(30)]
    assert [r["num_model_requests"] for b in buckets for r in b["results"]] == [1] * 30
    small = usage(api, **query, limit=10)
    assert (len(small["data"]), small["has_more"]) == (10, True)


def test_usage_ends_now_by_default(api: Billing) -> None:
    now_s = now_ms() // 1000
    body = usage(api, start_time=now_s - 3600, bucket_width="1h")
    assert body["has_more"] is False
    assert body["data"][-1]["start_time"] <= now_s < body["data"][-1]["end_time"]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({}, "start_time"),
        ({"start_time": -1}, "start_time"),
        ({"start_time": "yesterday"}, "start_time"),
        ({"start_time": 100, "end_time": 100}, "end_time"),
        ({"start_time": 100, "bucket_width": "1w"}, "bucket_width"),
        ({"start_time": 100, "group_by": "project_id"}, "group_by"),
        ({"start_time": 100, "group_by[]": "user"}, "group_by"),
        ({"start_time": 100, "limit": 32}, "limit"),
        ({"start_time": 100, "limit": 0}, "limit"),
        ({"start_time": 100, "bucket_width": "1m", "limit": 1441}, "limit"),
        ({"start_time": 100, "page": "nope"}, "page"),
        ({"start_time": 10**6, "end_time": 10**7, "page": "bkp1.AAAAAAAAAAA"}, "page"),
    ],
)
def test_bad_usage_queries_are_400(api: Billing, params: dict[str, Any], param: str) -> None:
    details = error(api("/v1/billing/usage", params=params), 400)
    assert details["param"] == param


# Invoices.


def test_invoice_json_flags_unpriced_usage(api: Billing, seeded: Seeded) -> None:
    seeded.record(seeded.acme, 2, model=PRICED, prompt_tokens=10, cached_tokens=2)
    seeded.record(seeded.acme, 1, model=UNPRICED, prompt_tokens=7, cached_tokens=0)
    seeded.record(seeded.acme, 1, started_at_ms=ms("2026-02-01T00:00:00"))  # next month
    response = api("/v1/billing/invoices?tenant=acme&period=2026-01")
    assert response.status_code == 200
    body = response.json()
    lines = body.pop("lines")
    assert body == {
        "object": "billing.invoice",
        "tenant_id": seeded.acme.id,
        "tenant_name": "acme",
        "period": "2026-01",
        "currency": "EUR",
        "start_ms": ms("2026-01-01T00:00:00"),
        "end_ms": ms("2026-02-01T00:00:00"),
        "requests": 3,
        "unpriced_requests": 1,
        "unpriced": True,
        "total_micros": sum(line["amount_micros"] or 0 for line in lines),
    }
    assert [(line["model"], line["token_class"], line["quantity"]) for line in lines] == [
        (UNPRICED, "prompt", 7),
        (UNPRICED, "completion", 5),
        (PRICED, "prompt", 16),
        (PRICED, "cached", 4),
        (PRICED, "completion", 10),
    ]
    assert [line["amount_micros"] for line in lines] == [None, None, 3, 1, 6]
    assert body["total_micros"] == 10
    by_id = api(f"/v1/billing/invoices?tenant={seeded.acme.id}&period=2026-01", ADMIN)
    assert by_id.json()["lines"] == lines
    own = api("/v1/billing/invoices?period=2026-01", seeded.acme_key).json()
    assert own["lines"] == lines
    priced_only = api("/v1/billing/invoices?tenant=acme&period=2026-02").json()
    assert (priced_only["unpriced"], priced_only["requests"]) == (False, 1)


def test_invoice_csv_by_format_or_accept(api: Billing, seeded: Seeded) -> None:
    seeded.record(seeded.acme, 2, model=PRICED)
    seeded.record(seeded.acme, 1, model=UNPRICED)
    expected = invoice_csv(invoice(seeded.conn, seeded.acme.id, "2026-01"))
    for response in (
        api("/v1/billing/invoices?tenant=acme&period=2026-01&format=csv"),
        api("/v1/billing/invoices?tenant=acme&period=2026-01", headers={"accept": "text/csv"}),
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/csv; charset=utf-8"
        assert "invoice-acme-2026-01.csv" in response.headers["content-disposition"]
        assert response.text == expected
    rows = list(csv.DictReader(io.StringIO(expected)))
    assert {row["model"] for row in rows} == {PRICED, UNPRICED}
    assert {row["amount_micros"] for row in rows if row["model"] == UNPRICED} == {""}
    explicit = api(
        "/v1/billing/invoices?tenant=acme&period=2026-01&format=json",
        headers={"accept": "text/csv"},
    )
    assert explicit.json()["object"] == "billing.invoice"


@pytest.mark.parametrize(
    ("query", "status", "param"),
    [
        ("period=2026-01", 400, "tenant"),
        ("tenant=acme", 400, "period"),
        ("tenant=acme&period=2026-13", 400, "period"),
        ("tenant=acme&period=January", 400, "period"),
        ("tenant=acme&period=9999-12", 400, "period"),
        ("tenant=acme&period=2026-01&format=pdf", 400, "format"),
        ("tenant=nobody&period=2026-01", 404, None),
    ],
)
def test_bad_invoice_queries(
    api: Billing, seeded: Seeded, query: str, status: int, param: str | None
) -> None:
    assert error(api(f"/v1/billing/invoices?{query}"), status)["param"] == param


def test_a_database_error_is_503(api: Billing) -> None:
    api.conn.close()
    details = error(api("/v1/billing/usage-events"), 503)
    assert details["code"] == "database_unavailable"

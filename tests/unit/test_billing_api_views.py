"""The billing and admin routes the console reads, in-process over a real ledger on both backends:
who the caller is, a tenant's keys, its quota and what remains of its budgets, refused requests in
buckets, the fleet and the change log."""

from __future__ import annotations

from typing import Any

from gateway.admin import create_app
from gateway.config import BillingConfig
from gateway.ledger.apikeys import create_key, revoke_key
from gateway.ledger.changes import recent_changes
from gateway.ledger.db import Connection, now_ms
from gateway.ledger.prices import set_price
from gateway.ledger.quotas import clear_quota, set_key_quota, set_tenant_quota
from gateway.ledger.refusals import add_refusals
from gateway.ledger.tenants import set_tenant_disabled
from gateway.quotas import QuotaPolicy, period_bounds
from tests.support.billing_app import ADMIN, BILLING, PRICE, PRICED, Billing, Seeded
from tests.support.openai_errors import error


def test_me_names_the_caller(api: Billing, seeded: Seeded) -> None:
    assert api("/v1/billing/me", ADMIN).json()["role"] == "admin"
    billing = api("/v1/billing/me", BILLING).json()
    assert billing == {
        "object": "billing.caller",
        "role": "billing",
        "tenant_id": None,
        "tenant_name": None,
        "currency": "EUR",
    }
    tenant = api("/v1/billing/me", seeded.acme_key).json()
    assert (tenant["role"], tenant["tenant_id"], tenant["tenant_name"]) == (
        "tenant",
        seeded.acme.id,
        "acme",
    )


def test_a_tenant_lists_its_own_keys_without_secrets(api: Billing, seeded: Seeded) -> None:
    second = create_key(seeded.conn, "acme", name="ci")
    revoke_key(seeded.conn, second.record.id)
    listed = api("/v1/billing/keys", seeded.acme_key).json()["data"]
    assert [key["id"] for key in listed] == [seeded.acme_key_id, second.record.id]
    assert (listed[1]["name"], listed[1]["revoked_at"] is None) == ("ci", False)
    assert listed[0]["revoked_at"] is None
    assert set(listed[0]) == {
        "object",
        "id",
        "tenant_id",
        "name",
        "prefix",
        "created_at",
        "revoked_at",
    }
    text = api("/v1/billing/keys", seeded.acme_key).text
    assert seeded.acme_key not in text
    assert second.key not in text
    assert seeded.beta_key_id not in text
    everyone = api("/v1/billing/keys", BILLING).json()["data"]
    assert {key["tenant_id"] for key in everyone} == {seeded.acme.id, seeded.beta.id}


def test_the_quota_shows_each_budget_against_what_the_ledger_holds(
    api: Billing, seeded: Seeded
) -> None:
    now = now_ms()
    set_price(seeded.conn, "priced-now", PRICE, 0)
    policy = QuotaPolicy(token_budget=1_000, money_budget_micros=2_000_000, budget_period="day")
    set_tenant_quota(seeded.conn, "acme", policy)
    set_key_quota(seeded.conn, seeded.acme_key_id, QuotaPolicy(requests_per_minute=5))
    set_tenant_quota(seeded.conn, "beta", QuotaPolicy(token_budget=7))
    seeded.record(seeded.acme, 3, started_at_ms=now, model="priced-now")  # 15 tokens each
    seeded.record(seeded.beta, 1, started_at_ms=now)
    document = api("/v1/billing/quota", seeded.acme_key).json()
    assert (document["object"], document["tenant_name"]) == ("billing.quota", "acme")
    tenant, key = document["data"]
    assert (tenant["scope"], tenant["id"], key["scope"], key["id"]) == (
        "tenant",
        seeded.acme.id,
        "key",
        seeded.acme_key_id,
    )
    start, end = period_bounds("day", now)
    tokens, money = tenant["budgets"]
    assert tokens == {
        "kind": "tokens",
        "period": "day",
        "period_start": start // 1000,
        "period_end": end // 1000,
        "limit": 1_000,
        "spent": 45,
        "remaining": 955,
    }
    assert (money["kind"], money["limit"]) == ("money", 2_000_000)
    assert 0 < money["spent"] < 2_000_000
    assert money["remaining"] == 2_000_000 - money["spent"]
    assert (key["policy"]["requests_per_minute"], key["budgets"]) == (5, [])
    beta = api("/v1/billing/quota?tenant=beta", BILLING).json()["data"][0]["budgets"][0]
    assert (beta["spent"], beta["remaining"]) == (15, 0), "never below zero"
    assert error(api("/v1/billing/quota", BILLING), 400)["param"] == "tenant"
    clear_quota(seeded.conn, seeded.acme.id)
    clear_quota(seeded.conn, seeded.acme_key_id)
    assert api("/v1/billing/quota", seeded.acme_key).json()["data"] == []


def test_refusals_come_in_usage_buckets_by_tenant_key_and_reason(
    api: Billing, seeded: Seeded
) -> None:
    hour = now_ms() - now_ms() % 3_600_000
    acme, beta = seeded.acme, seeded.beta
    add_refusals(
        seeded.conn,
        hour + 5_000,
        [
            {
                "tenant_id": acme.id,
                "key_id": seeded.acme_key_id,
                "reason": "rate_limit_exceeded",
                "count": 4,
            },
            {
                "tenant_id": beta.id,
                "key_id": seeded.beta_key_id,
                "reason": "insufficient_quota",
                "count": 2,
            },
        ],
    )
    add_refusals(
        seeded.conn,
        hour + 65_000,
        [
            {
                "tenant_id": acme.id,
                "key_id": seeded.acme_key_id,
                "reason": "rate_limit_exceeded",
                "count": 1,
            }
        ],
    )
    add_refusals(seeded.conn, hour, [])
    params: dict[str, Any] = {"start_time": hour // 1000, "end_time": hour // 1000 + 120}

    def results(token: str, **more: Any) -> list[list[dict[str, Any]]]:
        page = api("/v1/billing/refusals", token, params=params | more).json()
        assert page["object"] == "page"
        return [bucket["results"] for bucket in page["data"]]

    (day,) = results(BILLING, group_by="tenant_id,reason")
    assert [(r["tenant_id"], r["reason"], r["requests"]) for r in day] == sorted(
        [(acme.id, "rate_limit_exceeded", 5), (beta.id, "insufficient_quota", 2)]
    )
    minutes = results(seeded.acme_key, bucket_width="1m", group_by=["reason"])
    assert [[r["requests"] for r in bucket] for bucket in minutes] == [[4], [1]]
    assert minutes[0][0]["tenant_id"] is None, "null unless grouped by it"
    (own,) = results(seeded.acme_key, group_by="api_key_id")
    assert [(r["api_key_id"], r["requests"]) for r in own] == [(seeded.acme_key_id, 5)]
    bad = api("/v1/billing/refusals", BILLING, params=params | {"group_by": "model"})
    assert error(bad, 400)["param"] == "group_by"


def test_changes_are_logged_by_the_ledger_functions_that_make_them(seeded: Seeded) -> None:
    conn = seeded.conn
    key = create_key(conn, "beta", name="ci")
    revoke_key(conn, key.record.id)
    revoke_key(conn, key.record.id)  # again: nothing changes, nothing is logged
    set_tenant_quota(conn, "beta", QuotaPolicy(max_concurrent=2))
    clear_quota(conn, seeded.beta.id)
    assert not clear_quota(conn, seeded.beta.id)
    set_tenant_disabled(conn, seeded.beta.id, True)
    changes = recent_changes(conn, 100, seeded.beta.id)
    assert [c.action for c in changes] == [
        "tenant.disabled",
        "quota.cleared",
        "quota.set",
        "key.revoked",
        "key.created",
        "key.created",
        "tenant.created",
    ]
    assert changes[2].detail == {"scope": "tenant", "policy": {"max_concurrent": 2}}
    assert changes[4].detail == {"name": "ci", "prefix": key.record.prefix}
    assert key.key not in repr(changes)
    prices = [c for c in recent_changes(conn, 100) if c.action == "price.set"]
    assert [(c.subject_id, c.tenant_id) for c in prices] == [(PRICED, None)]
    assert len(recent_changes(conn, 2)) == 2


def test_the_admin_api_lists_changes_and_the_fleet(ledger: Connection) -> None:
    fleet = {
        "workers": [
            {
                "url": "http://w1",
                "healthy": True,
                "ejected": False,
                "ejections": 2,
                "outstanding": 1,
                "capacity": None,
                "models": ["m"],
                "load": {"running": 3, "waiting": 1, "kv_cache_usage": 0.25},
            }
        ],
        "queues": [{"model": "m", "tenant_id": "ten_x", "class": "batch", "count": 4}],
    }
    api = Billing(ledger)
    api.app = create_app(ledger, ADMIN, BILLING, BillingConfig(), fleet=lambda: fleet)
    assert api("/admin/v1/fleet", ADMIN).json() == fleet
    assert error(api("/admin/v1/fleet", BILLING), 401)["code"] == "invalid_admin_token"
    seeded = Seeded(ledger)
    listed = api("/admin/v1/changes?limit=3", ADMIN).json()["data"]
    assert [c["action"] for c in listed] == ["price.set", "key.created", "key.created"]
    beta = api("/admin/v1/changes?tenant=beta", ADMIN).json()["data"]
    assert {c["tenant_id"] for c in beta} == {seeded.beta.id}
    assert error(api("/admin/v1/changes?limit=0", ADMIN), 400)["param"] == "limit"
    assert error(api("/admin/v1/changes?tenant=nobody", ADMIN), 404)["code"] == "not_found"
    without = Billing(ledger)
    assert error(without("/admin/v1/fleet", ADMIN), 404)["code"] == "no_fleet"

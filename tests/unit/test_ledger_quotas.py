"""Quota policies, the price book, the policy snapshot and the spend seed, on both backends (a
SQLite file and a PostgreSQL database)."""

from __future__ import annotations

import pytest

from gateway.ledger.apikeys import create_key, revoke_key
from gateway.ledger.db import (
    SCHEMA_VERSION,
    ConflictError,
    Connection,
    NotFoundError,
    execute,
    open_ledger,
    query,
    schema_version,
)
from gateway.ledger.prices import list_prices, prices_in_effect, set_price
from gateway.ledger.quotas import (
    clear_quota,
    get_quota,
    list_quotas,
    policy_snapshot,
    set_key_quota,
    set_tenant_quota,
)
from gateway.ledger.tenants import create_tenant, set_tenant_disabled
from gateway.ledger.usage import UsageEvent, insert_usage_events, spent_in_current_periods
from gateway.quotas import QuotaPolicy
from tests.support.events import ms, price
from tests.support.events import usage_event as event
from tests.support.ledger_versions import downgrade


def test_a_version_1_ledger_migrates_to_quota_and_price_tables(ledger_url: str) -> None:
    with open_ledger(ledger_url) as old:
        downgrade(old, 1)
        execute(old, "INSERT INTO tenants VALUES ('ten_000000000001', 'acme', 0, ?)", (False,))
    with open_ledger(ledger_url) as conn:
        assert schema_version(conn) == SCHEMA_VERSION
        versions = query(conn, "SELECT version FROM schema_version ORDER BY version")
        assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
        set_tenant_quota(conn, "acme", QuotaPolicy(max_concurrent=2))
        set_price(conn, "m", price(1, 1, 1), effective_at=0)
        assert get_quota(conn, "ten_000000000001") == QuotaPolicy(max_concurrent=2)


def test_set_get_replace_and_clear_a_tenant_quota(ledger: Connection) -> None:
    acme = create_tenant(ledger, "acme")
    assert get_quota(ledger, acme.id) is None
    policy = QuotaPolicy(requests_per_minute=60, models=["b", "a"], budget_period="day")
    assert set_tenant_quota(ledger, "acme", policy) == acme
    assert get_quota(ledger, acme.id) == policy
    assert get_quota(ledger, acme.id).models == ["a", "b"]  # type: ignore[union-attr]

    replacement = QuotaPolicy(token_budget=1000)
    set_tenant_quota(ledger, acme.id, replacement)
    assert get_quota(ledger, acme.id) == replacement  # the whole policy, not a merge

    assert clear_quota(ledger, acme.id)
    assert get_quota(ledger, acme.id) is None
    assert not clear_quota(ledger, acme.id)


def test_key_quotas_and_the_listing(ledger: Connection) -> None:
    create_tenant(ledger, "acme")
    key = create_key(ledger, "acme").record
    assert set_key_quota(ledger, key.id, QuotaPolicy(max_concurrent=1)) == key
    set_tenant_quota(ledger, "acme", QuotaPolicy(money_budget_micros=5_000_000))
    quotas = list_quotas(ledger)
    assert [(q.subject_id, q.scope) for q in quotas] == [
        (key.id, "key"),
        (key.tenant_id, "tenant"),
    ]
    assert quotas[0].policy == QuotaPolicy(max_concurrent=1)
    assert quotas[0].updated_at > 0


def test_quotas_of_unknown_subjects_are_not_found(ledger: Connection) -> None:
    with pytest.raises(NotFoundError, match="no tenant"):
        set_tenant_quota(ledger, "nobody", QuotaPolicy())
    with pytest.raises(NotFoundError, match="no API key"):
        set_key_quota(ledger, "key_000000000000", QuotaPolicy())
    assert list_quotas(ledger) == []


def test_policy_snapshot_leaves_out_disabled_tenants_and_revoked_keys(ledger: Connection) -> None:
    acme, beta = create_tenant(ledger, "acme"), create_tenant(ledger, "beta")
    kept, revoked = create_key(ledger, "acme").record, create_key(ledger, "acme").record
    beta_key = create_key(ledger, "beta").record
    for subject in (acme.id, beta.id):
        set_tenant_quota(ledger, subject, QuotaPolicy(requests_per_minute=10))
    for subject in (kept.id, revoked.id, beta_key.id):
        set_key_quota(ledger, subject, QuotaPolicy(tokens_per_minute=100, models=["m"]))
    revoke_key(ledger, revoked.id)
    set_tenant_disabled(ledger, beta.id, True)

    snapshot = policy_snapshot(ledger, ms("2024-05-15T12:00:00"))
    assert list(snapshot["tenants"]) == [acme.id]
    assert list(snapshot["keys"]) == [kept.id]
    assert snapshot["tenants"][acme.id] == QuotaPolicy(requests_per_minute=10).limits()
    assert snapshot["keys"][kept.id]["models"] == ["m"]
    assert snapshot["prices"] == {}

    set_tenant_disabled(ledger, beta.id, False)
    snapshot = policy_snapshot(ledger, ms("2024-05-15T12:00:00"))
    assert set(snapshot["tenants"]) == {acme.id, beta.id}
    assert set(snapshot["keys"]) == {kept.id, beta_key.id}


def test_the_price_in_effect_is_the_latest_version_not_after_now(ledger: Connection) -> None:
    set_price(ledger, "m", price(1, 1, 1), effective_at=ms("2023-01-01T00:00:00"))
    set_price(ledger, "m", price(2, 2, 2), effective_at=ms("2024-01-01T00:00:00"))
    set_price(ledger, "m", price(3, 3, 3), effective_at=ms("2024-06-01T00:00:00"))
    set_price(ledger, "later", price(9, 9, 9), effective_at=ms("2024-06-01T00:00:00"))

    assert prices_in_effect(ledger, ms("2024-05-31T23:59:59")) == {"m": price(2, 2, 2)}
    assert prices_in_effect(ledger, ms("2024-06-01T00:00:00")) == {
        "later": price(9, 9, 9),
        "m": price(3, 3, 3),
    }
    assert prices_in_effect(ledger, ms("2022-01-01T00:00:00")) == {}
    snapshot = policy_snapshot(ledger, ms("2024-02-01T00:00:00"))
    assert snapshot["prices"] == {"m": {"prompt": 2, "cached": 2, "completion": 2}}
    assert [(v.model, v.price) for v in list_prices(ledger)] == [
        ("later", price(9, 9, 9)),
        ("m", price(1, 1, 1)),
        ("m", price(2, 2, 2)),
        ("m", price(3, 3, 3)),
    ]


def test_a_price_version_is_never_overwritten(ledger: Connection) -> None:
    set_price(ledger, "m", price(1, 1, 1), effective_at=1000)
    with pytest.raises(ConflictError, match="already has a price"):
        set_price(ledger, "m", price(2, 2, 2), effective_at=1000)
    now = set_price(ledger, "m", price(2, 2, 2))
    assert now.effective_at == now.created_at
    assert len(list_prices(ledger)) == 2


def test_spent_in_current_periods_counts_this_day_and_month_at_todays_prices(
    ledger: Connection,
) -> None:
    now = ms("2024-05-15T12:00:00")
    set_price(ledger, "m", price(9, 9, 9), effective_at=ms("2023-01-01T00:00:00"))
    set_price(
        ledger, "m", price(1_000_000, 500_000, 2_000_000), effective_at=ms("2024-01-01T00:00:00")
    )
    set_price(ledger, "m", price(7, 7, 7), effective_at=ms("2024-06-01T00:00:00"))
    set_price(ledger, "cheap", price(150_000, 0, 600_000), effective_at=0)

    def spend(tenant: str, key: str, at: str, model: str, p: int, c: int, o: int) -> UsageEvent:
        return event(
            tenant_id=tenant,
            key_id=key,
            started_at_ms=ms(at),
            model=model,
            prompt_tokens=p,
            cached_tokens=c,
            completion_tokens=o,
        )

    insert_usage_events(
        ledger,
        [
            # Today: 6 uncached, 4 cached, 5 completion tokens of m: 6 + 2 + 10 = 18 exactly.
            spend("ten_a", "key_1", "2024-05-15T08:00:00", "m", 10, 4, 5),
            # Today, twice 0.15 micro-units: each rounds up to 1 (not 0.3 rounded once).
            spend("ten_a", "key_1", "2024-05-15T09:00:00", "cheap", 1, 0, 0),
            spend("ten_a", "key_1", "2024-05-15T10:00:00", "cheap", 1, 0, 0),
            # The first millisecond of the day counts as today.
            spend("ten_a", "key_1", "2024-05-15T00:00:00", "m", 0, 0, 1),
            # Earlier this month, another key of the same tenant.
            spend("ten_a", "key_2", "2024-05-02T00:00:00", "m", 1000, 0, 1000),
            # More cached tokens than prompt tokens: all 3 prompt tokens priced as cached.
            spend("ten_b", "key_3", "2024-05-14T11:00:00", "m", 3, 5, 0),
            # Another tenant, today, a model without a price: tokens but no money.
            spend("ten_b", "key_3", "2024-05-15T11:00:00", "free", 7, 0, 3),
            # Outside the month: the last millisecond of April and the first of June.
            spend("ten_a", "key_1", "2024-04-30T23:59:59.999", "m", 100, 0, 100),
            spend("ten_a", "key_1", "2024-06-01T00:00:00", "m", 100, 0, 100),
        ],
    )

    def entry(scope: str, subject: str, period: str, tokens: int, money: int) -> dict[str, object]:
        tenant = {"key_1": "ten_a", "key_2": "ten_a", "key_3": "ten_b"}.get(subject, subject)
        return {
            "scope": scope,
            "id": subject,
            "tenant_id": tenant,
            "period": period,
            "tokens": tokens,
            "money_micros": money,
        }

    assert spent_in_current_periods(ledger, now) == [
        entry("tenant", "ten_a", "day", 18, 22),
        entry("tenant", "ten_a", "month", 2018, 3022),
        entry("tenant", "ten_b", "day", 10, 0),
        entry("tenant", "ten_b", "month", 13, 2),
        entry("key", "key_1", "day", 18, 22),
        entry("key", "key_1", "month", 18, 22),
        entry("key", "key_2", "day", 0, 0),
        entry("key", "key_2", "month", 2000, 3000),
        entry("key", "key_3", "day", 10, 0),
        entry("key", "key_3", "month", 13, 2),
    ]
    assert spent_in_current_periods(ledger, ms("2024-07-01T00:00:00")) == []

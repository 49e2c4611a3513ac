"""The `gateway` command's quota and price commands, in-process against a temporary ledger."""

from __future__ import annotations

import json

import pytest

from gateway.ledger.db import open_ledger
from gateway.ledger.prices import list_prices
from gateway.ledger.quotas import get_quota, policy_snapshot
from gateway.ledger.tenants import get_tenant_by_name_or_id
from gateway.quotas import QuotaPolicy
from tests.support.cli_run import run


@pytest.fixture
def acme(capsys: pytest.CaptureFixture[str], db: list[str]) -> str:
    """Creates the tenant `acme` and one key of it; returns the key id."""
    assert run(capsys, "tenants", "create", "acme", *db)[0] == 0
    code, out, _ = run(capsys, "keys", "create", "--tenant", "acme", "--json", *db)
    assert code == 0
    key_id: str = json.loads(out)["id"]
    return key_id


def test_tenant_set_quota_show_and_clear(
    capsys: pytest.CaptureFixture[str], db: list[str], acme: str
) -> None:
    code, out, _ = run(
        capsys,
        "tenants",
        "set-quota",
        "acme",
        "--rpm",
        "60",
        "--tpm",
        "10000",
        "--concurrency",
        "4",
        "--max-sequences",
        "8",
        "--token-budget",
        "1000000",
        "--money-budget",
        "12.50",
        "--period",
        "day",
        "--models",
        "b-model,a-model",
        "--weight",
        "3",
        "--priority",
        "batch",
        *db,
    )
    assert code == 0
    assert out.startswith("set the quota of tenant acme (ten_")
    expected = QuotaPolicy(
        requests_per_minute=60,
        tokens_per_minute=10_000,
        max_concurrent=4,
        max_sequences=8,
        token_budget=1_000_000,
        money_budget_micros=12_500_000,
        budget_period="day",
        models=["a-model", "b-model"],
        weight=3,
        priority="batch",
    )
    with open_ledger(db[1]) as conn:
        tenant = get_tenant_by_name_or_id(conn, "acme")
        assert get_quota(conn, tenant.id) == expected

    code, out, _ = run(capsys, "tenants", "quota", "acme", "--json", *db)
    assert (code, json.loads(out)) == (0, expected.model_dump())
    code, out, _ = run(capsys, "tenants", "quota", "acme", *db)
    assert out.splitlines()[1:] == [
        "  requests/min  60",
        "  tokens/min    10000",
        "  concurrency   4",
        "  sequences     8 per request",
        "  token budget  1000000 per day",
        "  money budget  12.5 per day",
        "  models        a-model, b-model",
        "  weight        3",
        "  priority      batch at most",
    ]

    code, out, _ = run(capsys, "tenants", "clear-quota", "acme", *db)
    assert (code, out.endswith("it is unlimited\n")) == (0, True)
    code, out, _ = run(capsys, "tenants", "quota", "acme", *db)
    assert "has no quota: it is unlimited" in out
    assert run(capsys, "tenants", "quota", "acme", "--json", *db)[1] == "null\n"
    assert "had no quota" in run(capsys, "tenants", "clear-quota", "acme", *db)[1]


def test_set_quota_replaces_the_whole_policy(
    capsys: pytest.CaptureFixture[str], db: list[str], acme: str
) -> None:
    run(capsys, "tenants", "set-quota", "acme", "--rpm", "60", "--models", "m", *db)
    run(capsys, "tenants", "set-quota", "acme", "--concurrency", "2", *db)
    out = run(capsys, "tenants", "quota", "acme", "--json", *db)[1]
    assert json.loads(out) == QuotaPolicy(max_concurrent=2).model_dump()
    assert "Replaces the whole policy" in run(capsys, "tenants", "set-quota", "--help")[1]


def test_key_quota_commands(capsys: pytest.CaptureFixture[str], db: list[str], acme: str) -> None:
    code, out, _ = run(capsys, "keys", "set-quota", acme, "--concurrency", "1", *db)
    assert (code, out) == (0, f"set the quota of key {acme} of tenant acme\n")
    with open_ledger(db[1]) as conn:
        assert policy_snapshot(conn, 0)["keys"][acme]["max_concurrent"] == 1
    code, out, _ = run(capsys, "keys", "quota", acme, "--json", *db)
    assert json.loads(out)["max_concurrent"] == 1
    assert run(capsys, "keys", "clear-quota", acme, *db)[0] == 0
    with open_ledger(db[1]) as conn:
        assert policy_snapshot(conn, 0)["keys"] == {}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--rpm", "0"], "--rpm: Input should be greater than or equal to 1"),
        (["--concurrency", "-2"], "--concurrency: Input should be greater than or equal to 1"),
        (["--money-budget", "-1"], "--money-budget: '-1' is not an amount"),
        (["--money-budget", "0.0000001"], "--money-budget: '0.0000001' has more than 6 decimals"),
        (["--money-budget", "0"], "--money-budget: Input should be greater than or equal to 1"),
        (["--models", "a,,b"], "--models: model names must be non-empty"),
    ],
)
def test_invalid_quota_options_exit_2_naming_the_option(
    capsys: pytest.CaptureFixture[str], db: list[str], acme: str, options: list[str], message: str
) -> None:
    code, out, err = run(capsys, "tenants", "set-quota", "acme", *options, *db)
    assert (code, out) == (2, "")
    assert message in err
    with open_ledger(db[1]) as conn:
        assert get_quota(conn, get_tenant_by_name_or_id(conn, "acme").id) is None


def test_quotas_of_unknown_subjects_exit_1(
    capsys: pytest.CaptureFixture[str], db: list[str]
) -> None:
    for argv in (
        ("tenants", "set-quota", "nobody", "--rpm", "1"),
        ("tenants", "quota", "nobody"),
        ("keys", "set-quota", "key_000000000000"),
        ("keys", "clear-quota", "key_000000000000"),
    ):
        code, out, err = run(capsys, *argv, *db)
        assert (code, out) == (1, ""), argv
        assert err.startswith("error: no "), argv


def test_prices_set_and_list(capsys: pytest.CaptureFixture[str], db: list[str]) -> None:
    base = ("prices", "set", "org/model-7b")
    code, out, _ = run(
        capsys,
        *base,
        "--prompt",
        "0.15",
        "--cached",
        "0.075",
        "--completion",
        "0.6",
        "--effective-at",
        "2024-01-01T00:00:00Z",
        *db,
    )
    assert code == 0
    assert out == (
        "price of org/model-7b from 2024-01-01 00:00:00 UTC, per million tokens: "
        "prompt 0.15, cached 0.075, completion 0.6\n"
    )
    later = ("--prompt", "0.2", "--cached", "0.1", "--completion", "0.8")
    assert run(capsys, *base, *later, "--effective-at", "2023-06-01T02:00:00+02:00", *db)[0] == 0
    assert run(capsys, *base, *later, "--effective-at", "2999-01-01", *db)[0] == 0
    with open_ledger(db[1]) as conn:
        versions = list_prices(conn)
    assert [(v.effective_at, v.prompt_per_mtok) for v in versions] == [
        (1_685_577_600_000, 200_000),
        (1_704_067_200_000, 150_000),
        (32_472_144_000_000, 200_000),
    ]
    assert (versions[1].cached_per_mtok, versions[1].completion_per_mtok) == (75_000, 600_000)

    code, out, _ = run(capsys, "prices", "list", *db)
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == [
        "MODEL",
        "EFFECTIVE",
        "(UTC)",
        "PROMPT/MTOK",
        "CACHED/MTOK",
        "COMPLETION/MTOK",
        "STATUS",
    ]
    assert [(row[3], row[-1]) for row in rows[1:]] == [
        ("0.2", "superseded"),
        ("0.15", "current"),
        ("0.2", "scheduled"),
    ]
    code, out, _ = run(capsys, "prices", "list", "--json", *db)
    assert [v["status"] for v in json.loads(out)] == ["superseded", "current", "scheduled"]
    assert json.loads(out)[1]["prompt_per_mtok"] == 150_000


def test_bad_prices_exit_2_or_1(capsys: pytest.CaptureFixture[str], db: list[str]) -> None:
    amounts = ("--prompt", "1", "--cached", "1", "--completion", "1")
    code, _, err = run(capsys, "prices", "set", "m", *amounts[:-1], "1.0000001", *db)
    assert code == 2
    assert "--completion: '1.0000001' has more than 6 decimals" in err
    code, _, err = run(capsys, "prices", "set", "m", *amounts, "--effective-at", "soon", *db)
    assert code == 2
    assert "--effective-at: 'soon' is not an ISO 8601 time" in err
    assert run(capsys, "prices", "set", "m", *amounts, "--effective-at", "2024-01-01", *db)[0] == 0
    code, _, err = run(capsys, "prices", "set", "m", *amounts, "--effective-at", "2024-01-01", *db)
    assert code == 1
    assert "already has a price" in err
    assert run(capsys, "prices", "set", "m", "--prompt", "1", *db)[0] == 2

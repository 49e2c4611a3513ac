"""Quota policies and prices as values: validation, the core's `Limits`, exact money amounts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.quotas import Price, QuotaPolicy, format_money, parse_money, period_bounds
from tests.support.events import ms


def test_an_empty_policy_is_unlimited_with_a_monthly_period() -> None:
    assert QuotaPolicy().limits() == {
        "requests_per_minute": None,
        "tokens_per_minute": None,
        "max_concurrent": None,
        "max_sequences": None,
        "token_budget": None,
        "money_budget_micros": None,
        "budget_period": "month",
        "models": None,
        "weight": 1,
        "priority": "interactive",
    }


def test_limits_carry_every_field_and_models_are_sorted_without_duplicates() -> None:
    policy = QuotaPolicy(
        requests_per_minute=60,
        tokens_per_minute=10_000,
        max_concurrent=4,
        max_sequences=16,
        token_budget=1_000_000,
        money_budget_micros=12_500_000,
        budget_period="day",
        models=["b-model", "a-model", "b-model"],
        weight=4,
        priority="batch",
    )
    assert policy.limits() == {
        "requests_per_minute": 60,
        "tokens_per_minute": 10_000,
        "max_concurrent": 4,
        "max_sequences": 16,
        "token_budget": 1_000_000,
        "money_budget_micros": 12_500_000,
        "budget_period": "day",
        "models": ["a-model", "b-model"],
        "weight": 4,
        "priority": "batch",
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"requests_per_minute": 0}, "greater than or equal to 1"),
        ({"max_concurrent": -1}, "greater than or equal to 1"),
        ({"money_budget_micros": 0}, "greater than or equal to 1"),
        ({"token_budget": "100"}, "valid integer"),
        ({"tokens_per_minute": True}, "valid integer"),
        ({"budget_period": "week"}, "'day' or 'month'"),
        ({"models": []}, "at least 1 item"),
        ({"models": ["ok", ""]}, "non-empty"),
        ({"token_budget": 2**53}, "less than or equal to 9007199254740991"),
        ({"money_budget_micros": 2**63}, "less than or equal to 9007199254740991"),
        ({"max_sequences": 0}, "greater than or equal to 1"),
        ({"models": ["m" * 513]}, "at most 512 characters"),
        ({"models": ["a\x00b"]}, "control characters"),
        ({"models": ["a\nb"]}, "control characters"),
        ({"models": [" padded"]}, "non-empty"),
        ({"rpm": 5}, "Extra inputs are not permitted"),
        ({"weight": 0}, "greater than or equal to 1"),
        ({"weight": 2**62}, "less than or equal to 10000"),
        ({"priority": "urgent"}, "'interactive' or 'batch'"),
    ],
)
def test_invalid_policies_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        QuotaPolicy.model_validate(fields)


def test_price_entry_and_bounds() -> None:
    price = Price(prompt_per_mtok=150_000, cached_per_mtok=75_000, completion_per_mtok=600_000)
    assert price.entry() == {"prompt": 150_000, "cached": 75_000, "completion": 600_000}
    assert Price(prompt_per_mtok=0, cached_per_mtok=0, completion_per_mtok=0).entry()["prompt"] == 0
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        Price(prompt_per_mtok=-1, cached_per_mtok=0, completion_per_mtok=0)


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("12.50", 12_500_000),
        ("0.15", 150_000),
        ("3", 3_000_000),
        ("0", 0),
        ("0.000001", 1),
        ("1234567.123456", 1_234_567_123_456),
        ("0.100000", 100_000),
    ],
)
def test_parse_money_is_exact(text: str, micros: int) -> None:
    assert parse_money(text) == micros


@pytest.mark.parametrize(
    "text", ["-1", "-0.5", "0.0000001", "1e3", "+1", " 1", "1.", ".5", "", "1,5", "NaN", "1_0"]
)
def test_parse_money_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not an amount|more than 6 decimals"):
        parse_money(text)


@pytest.mark.parametrize(
    ("micros", "text"), [(12_500_000, "12.5"), (150_000, "0.15"), (3_000_000, "3"), (1, "0.000001")]
)
def test_format_money_round_trips(micros: int, text: str) -> None:
    assert format_money(micros) == text
    assert parse_money(text) == micros


def test_period_bounds_are_the_utc_day_and_month() -> None:
    now = ms("2024-02-29T23:59:59.999")
    assert period_bounds("day", now) == (ms("2024-02-29T00:00:00"), ms("2024-03-01T00:00:00"))
    assert period_bounds("month", now) == (ms("2024-02-01T00:00:00"), ms("2024-03-01T00:00:00"))
    december = ms("2023-12-31T12:00:00")
    assert period_bounds("month", december) == (
        ms("2023-12-01T00:00:00"),
        ms("2024-01-01T00:00:00"),
    )
    midnight = ms("2024-03-01T00:00:00")
    assert period_bounds("day", midnight)[0] == midnight

"""Quota policies and prices as values: validation, the core's `Limits` document, money amounts.

A policy limits one tenant or one key; a subject without one is unlimited. Money is an integer of
micro-units of currency everywhere; `parse_money` is the one way a decimal amount becomes one.
Storage is in `gateway.ledger.quotas` and `gateway.ledger.prices`; enforcement is the core's.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Literal, TypedDict

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from gateway.bounds import MAX_COUNT, MAX_MODEL_NAME, check_plain_text

__all__ = [
    "MICROS",
    "Limits",
    "Period",
    "Price",
    "PriceEntry",
    "QuotaPolicy",
    "Scope",
    "format_money",
    "parse_money",
    "period_bounds",
]

MICROS = 1_000_000
"""Micro-units in one unit of currency."""


Period = Literal["day", "month"]
Scope = Literal["tenant", "key"]
Priority = Literal["interactive", "batch"]

_AMOUNT = re.compile(r"[0-9]+(\.[0-9]+)?")


def parse_money(text: str) -> int:
    """An amount such as `12.50` or `0.15` as exact micro-units (12_500_000, 150_000).

    Raises ValueError for anything but digits with an optional fraction of at most 6 digits:
    negatives, exponents, signs and blanks included.
    """
    if not _AMOUNT.fullmatch(text):
        raise ValueError(f"{text!r} is not an amount such as 12.50")
    amount = Decimal(text)
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -6:
        raise ValueError(f"{text!r} has more than 6 decimals (the unit is a millionth)")
    return int(amount * MICROS)


def format_money(micros: int) -> str:
    """Micro-units as the shortest exact decimal amount: 12_500_000 -> `12.5`, 3_000_000 -> `3`."""
    whole, fraction = divmod(micros, MICROS)
    return f"{whole}.{fraction:06d}".rstrip("0").rstrip(".")


def period_bounds(period: Period, now_ms: int) -> tuple[int, int]:
    """The UTC day or month containing `now_ms`, as [start, end) unix milliseconds."""
    now = datetime.fromtimestamp(now_ms // 1000, UTC)
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        end = start + timedelta(days=1)
    else:
        start = start.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    return int(start.timestamp()) * 1000, int(end.timestamp()) * 1000


def _normalise_models(models: list[str] | None) -> list[str] | None:
    if models is None:
        return None
    if any(not name.strip() or name != name.strip() for name in models):
        raise ValueError("model names must be non-empty, without surrounding blanks")
    for name in models:
        check_plain_text(name)
    return sorted(set(models))


Limit = Annotated[int | None, Field(ge=1, le=MAX_COUNT)]
ModelName = Annotated[str, Field(max_length=MAX_MODEL_NAME)]


class Limits(TypedDict):
    """One subject's entry in the document `gateway._core.Gateway.set_policies` takes."""

    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent: int | None
    max_sequences: int | None
    token_budget: int | None
    money_budget_micros: int | None
    budget_period: Period
    models: list[str] | None
    weight: int
    priority: Priority


class QuotaPolicy(BaseModel):
    """The limits of one tenant or one key; a limit left out (null) is no limit.

    A request is admitted only if both its tenant's and its key's policies allow it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    requests_per_minute: Limit = Field(default=None, description="Requests started per minute.")
    tokens_per_minute: Limit = Field(
        default=None, description="Prompt plus completion tokens per minute."
    )
    max_concurrent: Limit = Field(default=None, description="Requests in flight at once.")
    max_sequences: Limit = Field(
        default=None,
        description="Sequences one request may generate: `n` times its prompts (a completions "
        "batch has several); more is a 400 `too_many_sequences`.",
    )
    token_budget: Limit = Field(
        default=None,
        description="Prompt plus completion tokens per budget period; a request is admitted "
        "only if its worst case fits in what is left.",
    )
    money_budget_micros: Limit = Field(
        default=None,
        description="Spend per budget period, in micro-units of currency, at the price book's "
        "prices.",
    )
    budget_period: Period = Field(
        default="month",
        description="The budgets' period: the UTC day or the UTC month (from the 1st, 00:00 UTC).",
    )
    models: Annotated[list[ModelName] | None, AfterValidator(_normalise_models)] = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="Models that may be used (null: every model); stored sorted, without "
        "duplicates.",
    )

    weight: int = Field(
        default=1,
        ge=1,
        le=10_000,
        description="A tenant's share of a busy model against other tenants': while requests "
        "wait for a worker, each tenant is served tokens in proportion to its weight (a key's "
        "weight is not used).",
    )
    priority: Priority = Field(
        default="interactive",
        description="The most urgent class (`interactive` or `batch`) its requests may take, "
        "and the class of those that ask for none (`X-Priority`, vLLM's `priority`).",
    )

    def limits(self) -> Limits:
        """This policy as the core's `Limits` (every key present)."""
        return {
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "max_concurrent": self.max_concurrent,
            "max_sequences": self.max_sequences,
            "token_budget": self.token_budget,
            "money_budget_micros": self.money_budget_micros,
            "budget_period": self.budget_period,
            "models": self.models,
            "weight": self.weight,
            "priority": self.priority,
        }


PerMtok = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class PriceEntry(TypedDict):
    """One model's prices in the document `gateway._core.Gateway.set_policies` takes."""

    prompt: int
    cached: int
    completion: int


class Price(BaseModel):
    """A model's prices, in micro-units of currency per million tokens.

    A request costs ceil(((prompt - cached) * prompt_per_mtok + cached * cached_per_mtok +
    completion * completion_per_mtok) / 1_000_000) micro-units.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    prompt_per_mtok: PerMtok = Field(description="Per million uncached prompt tokens.")
    cached_per_mtok: PerMtok = Field(description="Per million prompt tokens served from cache.")
    completion_per_mtok: PerMtok = Field(description="Per million completion tokens.")

    def entry(self) -> PriceEntry:
        """This price as the core's price entry."""
        return {
            "prompt": self.prompt_per_mtok,
            "cached": self.cached_per_mtok,
            "completion": self.completion_per_mtok,
        }

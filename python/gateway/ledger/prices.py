"""The price book: versions of each model's prices, each in effect from its `effective_at` on.

Versions are never edited: a new price is a new version, possibly scheduled in the future. The price
in effect at a time is the version with the latest `effective_at` not after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.ledger.changes import record_change
from gateway.ledger.db import (
    ConflictError,
    Connection,
    IntegrityError,
    LedgerError,
    execute,
    now_ms,
    query,
    query_as,
    transaction,
)
from gateway.quotas import Price

__all__ = [
    "PRICES_IN_EFFECT_SQL",
    "PriceVersion",
    "list_prices",
    "prices_in_effect",
    "set_price",
]

_COLUMNS = "model, effective_at, prompt_per_mtok, cached_per_mtok, completion_per_mtok, created_at"

PRICES_IN_EFFECT_SQL = (
    "SELECT p.model, p.prompt_per_mtok, p.cached_per_mtok, p.completion_per_mtok FROM prices p "
    "WHERE p.effective_at = (SELECT MAX(v.effective_at) FROM prices v "
    "WHERE v.model = p.model AND v.effective_at <= ?)"
)
"""One row per model priced at the time given as its one parameter (unix ms): model and its three
prices. Other queries use it as a subquery."""


@dataclass(frozen=True, slots=True)
class PriceVersion:
    """One version of a model's prices (micro-units per million tokens); times are unix ms."""

    model: str
    effective_at: int
    prompt_per_mtok: int
    cached_per_mtok: int
    completion_per_mtok: int
    created_at: int

    @property
    def price(self) -> Price:
        return Price(
            prompt_per_mtok=self.prompt_per_mtok,
            cached_per_mtok=self.cached_per_mtok,
            completion_per_mtok=self.completion_per_mtok,
        )


def set_price(
    conn: Connection, model: str, price: Price, effective_at: int | None = None
) -> PriceVersion:
    """Adds a version of `model`'s prices, in effect from `effective_at` (default: now).

    `ConflictError` if the model already has a version from that exact time.
    """
    if not model:
        raise LedgerError("a price needs a model name")
    created_at = now_ms()
    version = PriceVersion(
        model=model,
        effective_at=created_at if effective_at is None else effective_at,
        prompt_per_mtok=price.prompt_per_mtok,
        cached_per_mtok=price.cached_per_mtok,
        completion_per_mtok=price.completion_per_mtok,
        created_at=created_at,
    )
    try:
        with transaction(conn):
            execute(
                conn,
                f"INSERT INTO prices ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    version.model,
                    version.effective_at,
                    version.prompt_per_mtok,
                    version.cached_per_mtok,
                    version.completion_per_mtok,
                    version.created_at,
                ),
            )
            detail = {"effective_at": version.effective_at, **price.model_dump()}
            record_change(conn, "price.set", model, None, detail)
    except IntegrityError as exc:
        raise ConflictError(
            f"model {model!r} already has a price effective at {version.effective_at} ms"
        ) from exc
    return version


def list_prices(conn: Connection) -> list[PriceVersion]:
    """Every version, scheduled and superseded ones included, by model then effective time."""
    sql = f"SELECT {_COLUMNS} FROM prices ORDER BY model, effective_at"  # noqa: S608
    return query_as(conn, PriceVersion, sql)


def prices_in_effect(conn: Connection, at_ms: int) -> dict[str, Price]:
    """Each priced model's prices in effect at `at_ms`, by model name."""
    rows = query(conn, PRICES_IN_EFFECT_SQL + " ORDER BY p.model", (at_ms,))
    return {
        row[0]: Price(prompt_per_mtok=row[1], cached_per_mtok=row[2], completion_per_mtok=row[3])
        for row in rows
    }

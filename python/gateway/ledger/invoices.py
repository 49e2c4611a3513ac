"""Invoices: a tenant's usage events of one UTC calendar month, priced, as line items.

A line is one token class of one model at one price version: its quantity, its unit price (per
million tokens) and its amount, `ceil(quantity * unit price / 1,000,000)` micro-units, so a
customer can check every line by hand. Rounding once per line, an invoice never exceeds the sum of
its events' `cost_micros` (each rounded up), and falls short of it by less than a micro-unit per
event. Usage of a model that had no price at the time is listed with no unit price and no amount,
and flagged: never billed at zero.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Literal

from gateway.ledger.db import Connection, query
from gateway.quotas import MICROS, period_bounds

__all__ = ["Invoice", "InvoiceLine", "TokenClass", "invoice", "invoice_csv", "month_bounds"]

TokenClass = Literal["prompt", "cached", "completion"]
_CLASSES: tuple[TokenClass, ...] = ("prompt", "cached", "completion")
_PERIOD = re.compile(r"(\d{4})-(\d{2})")


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    model: str
    price_effective_at: int | None
    token_class: TokenClass
    quantity: int
    unit_price_per_mtok_micros: int | None
    amount_micros: int | None


@dataclass(frozen=True, slots=True)
class Invoice:
    """`total_micros` sums the priced lines; `unpriced_requests` counts the events of `lines`
    without a price (their lines have no amount)."""

    tenant_id: str
    period: str
    start_ms: int
    end_ms: int
    requests: int
    unpriced_requests: int
    total_micros: int
    lines: list[InvoiceLine]


def month_bounds(period: str) -> tuple[int, int]:
    """The UTC month `YYYY-MM` as [start, end) unix ms; `ValueError` if it is not one."""
    match = _PERIOD.fullmatch(period)
    if match is None or not 1 <= int(match[2]) <= 12 or not 1970 <= int(match[1]) <= 9998:
        raise ValueError(f"a period is a month, YYYY-MM: {period!r}")
    start = datetime(int(match[1]), int(match[2]), 1, tzinfo=UTC)
    return period_bounds("month", int(start.timestamp()) * 1000)


# Per model and price version of the tenant's events in [start, end): requests, the token classes,
# and the version's unit prices (NULL when unpriced).
_GROUPS = """
SELECT e.model, e.price_effective_at, COUNT(*), SUM(e.prompt_tokens), SUM(e.cached_tokens),
    SUM(e.completion_tokens), p.prompt_per_mtok, p.cached_per_mtok, p.completion_per_mtok
FROM usage_events e
LEFT JOIN prices p ON p.model = e.model AND p.effective_at = e.price_effective_at
WHERE e.tenant_id = ? AND e.started_at_ms >= ? AND e.started_at_ms < ?
GROUP BY e.model, e.price_effective_at, p.prompt_per_mtok, p.cached_per_mtok,
    p.completion_per_mtok
ORDER BY e.model, e.price_effective_at NULLS FIRST
"""


def invoice(conn: Connection, tenant_id: str, period: str) -> Invoice:
    """The invoice of `tenant_id` for the UTC month `period` (`YYYY-MM`): lines by model, then
    price version (unpriced first), then class; classes with no tokens are left out."""
    start, end = month_bounds(period)
    lines: list[InvoiceLine] = []
    requests = unpriced = 0
    for model, version, count, *rest in query(conn, _GROUPS, (tenant_id, start, end)):
        quantities, prices = rest[:3], rest[3:]
        requests += int(count)
        if version is None:
            unpriced += int(count)
        for token_class, quantity, unit in zip(_CLASSES, quantities, prices, strict=True):
            if quantity:
                amount = None if unit is None else -(-int(quantity) * int(unit) // MICROS)
                lines.append(InvoiceLine(model, version, token_class, int(quantity), unit, amount))
    total = sum(line.amount_micros or 0 for line in lines)
    return Invoice(tenant_id, period, start, end, requests, unpriced, total, lines)


def invoice_csv(invoice: Invoice) -> str:
    """The invoice's lines as CSV with a header row: tenant and period on every line."""
    out = io.StringIO()
    fields = list(InvoiceLine.__dataclass_fields__)
    writer = csv.DictWriter(out, ["tenant_id", "period", *fields], lineterminator="\n")
    writer.writeheader()
    for line in invoice.lines:
        writer.writerow({"tenant_id": invoice.tenant_id, "period": invoice.period} | asdict(line))
    return out.getvalue()

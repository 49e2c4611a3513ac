"""What every `gateway` command shares: the ledger it opens, how it reports errors and prints."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from gateway.config import BillingConfig, load_config
from gateway.ledger.db import Connection, open_ledger, parse_url

__all__ = [
    "DEFAULT_DB_URL",
    "Handler",
    "UsageError",
    "currency",
    "database_url",
    "format_table",
    "format_time",
    "ledger",
    "print_json",
    "with_ledger",
]

DEFAULT_DB_URL = "sqlite:///data/gateway.db"

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A command line that cannot be acted on (exit status 2)."""


def database_url(args: argparse.Namespace) -> str:
    if args.config is not None:
        return load_config(args.config).storage.url
    if args.db is not None:
        try:
            parse_url(args.db)
        except ValueError as exc:
            raise UsageError(f"--db: {exc}") from None
        return str(args.db)
    return DEFAULT_DB_URL


def currency(args: argparse.Namespace) -> str:
    """The currency of `--config`'s `[billing]`, else the default one."""
    if args.config is not None:
        return load_config(args.config).billing.currency
    return BillingConfig().currency


def ledger(args: argparse.Namespace) -> Any:
    return open_ledger(database_url(args))


def format_time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table; integer columns are right-aligned."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    numeric = [
        bool(rows) and all(isinstance(row[i], int) for row in rows) for i in range(len(widths))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(row) for row in cells)])


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def with_ledger(action: Callable[[Connection, argparse.Namespace], int]) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        with ledger(args) as conn:
            return action(conn, args)

    return handler

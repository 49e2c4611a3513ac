"""`gateway invoice` and `gateway export`: a tenant's monthly invoice and the raw usage events, in
the billing API's documents (`gateway.billing`), over the ledger's repository functions."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from pydantic_core import to_jsonable_python

from gateway.billing import (
    EVENT_CSV_COLUMNS,
    cursor_after,
    event_csv_row,
    event_document,
    invoice_document,
    resume_seq,
)
from gateway.cli_common import (
    UsageError,
    currency,
    format_table,
    format_time,
    print_json,
    with_ledger,
)
from gateway.ledger.db import Connection, DatabaseError
from gateway.ledger.invoices import Invoice, invoice, invoice_csv
from gateway.ledger.tenants import Tenant, get_tenant_by_name_or_id
from gateway.ledger.usage import (
    StoredEvent,
    events_after,
)
from gateway.quotas import format_money

__all__ = ["EXPORT_PAGE", "add_billing_commands"]

EXPORT_PAGE = 1000
"""Events `gateway export` reads per ledger query."""


def _money(micros: int | None, missing: str) -> str:
    return missing if micros is None else format_money(micros)


def _requests(count: int) -> str:
    return f"{count} request{'' if count == 1 else 's'}"


def _print_invoice(found: Invoice, tenant: Tenant, unit: str) -> None:
    print(f"invoice of {tenant.name} ({tenant.id}) for {found.period} (UTC), in {unit}")
    rows = [
        (
            line.model,
            format_time(line.price_effective_at),
            line.token_class,
            line.quantity,
            _money(line.unit_price_per_mtok_micros, "-"),
            _money(line.amount_micros, "unpriced"),
        )
        for line in found.lines
    ]
    headers = ("MODEL", "PRICE FROM (UTC)", "CLASS", "TOKENS", "PER 1M", "AMOUNT")
    print(format_table(headers, rows))
    print(f"total {format_money(found.total_micros)} {unit} for {_requests(found.requests)}")
    if found.unpriced_requests:
        unpriced = _requests(found.unpriced_requests)
        print(f"not in the total: {unpriced} of a model that had no price")


def _invoice(conn: Connection, args: argparse.Namespace) -> int:
    tenant = get_tenant_by_name_or_id(conn, args.tenant)
    try:
        found = invoice(conn, tenant.id, args.period)
    except (ValueError, OverflowError):  # a month past the calendar's range overflows
        raise UsageError(f"--period: a month, YYYY-MM, not {args.period!r}") from None
    unit = currency(args)
    if args.format == "csv":
        sys.stdout.write(invoice_csv(found))
    elif args.format == "json":
        print_json(to_jsonable_python(invoice_document(found, tenant.name, unit)))
    else:
        _print_invoice(found, tenant, unit)
    return 0


def _export(conn: Connection, args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit: at least 1")
    tenant_id = None if args.tenant is None else get_tenant_by_name_or_id(conn, args.tenant).id
    # The billing API's cursors: a cursor of one kind resumes only the same kind of export.
    try:
        after = resume_seq(conn, args.after, tenant_id)
    except ValueError as exc:
        raise UsageError(f"--after: {exc}") from None
    last: StoredEvent | None = None

    def cursor() -> str:
        """The cursor after the last event written (the one given, if none was)."""
        return cursor_after(last, args.after, tenant_id)

    unit = currency(args)
    left = args.limit
    writer = None
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, EVENT_CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
    try:
        while left is None or left > 0:
            size = EXPORT_PAGE if left is None else min(EXPORT_PAGE, left)
            events = events_after(conn, after, size, tenant_id)
            for event in events:
                document = event_document(event, unit)
                if writer is not None:
                    writer.writerow(event_csv_row(document))
                else:
                    print(json.dumps(document, separators=(",", ":")))
                last, after = event, event.seq
            sys.stdout.flush()
            if len(events) < size:
                break
            if left is not None:
                left -= size
    except BrokenPipeError:
        # The reader went away (`| head`): what it read is unknown, so there is no cursor to
        # resume from. Quiet, as a pipeline expects; stdout goes nowhere so exiting cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (KeyboardInterrupt, DatabaseError):
        # What was written reaches stdout as the process exits: resume after it.
        print(f"next cursor: {cursor()}", file=sys.stderr)
        raise
    print(f"next cursor: {cursor()}", file=sys.stderr)
    return 0


def add_billing_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    database: argparse.ArgumentParser,
) -> None:
    """`invoice` and `export`."""
    p = commands.add_parser(
        "invoice",
        parents=[database],
        help="a tenant's invoice for a UTC month",
        description="A tenant's invoice for a UTC month: a line per model, price version and "
        "token class; usage of a model without a price is listed and left out of the total.",
    )
    p.add_argument("--tenant", required=True, metavar="NAME_OR_ID")
    p.add_argument("--period", required=True, metavar="YYYY-MM")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.set_defaults(handler=with_ledger(_invoice))

    p = commands.add_parser(
        "export",
        parents=[database],
        help="raw usage events in commit order",
        description="Writes usage events, in the order the ledger committed them, to stdout "
        "(the billing API's event documents), and the cursor to resume from to stderr as "
        "`next cursor: ...`: an export resumed with --after sees every event exactly once. With "
        "--tenant, the cursor is one of that tenant's events (`evt1.`), as the billing API gives "
        "a tenant; without, one of every tenant's (`evc1.`).",
    )
    p.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    p.add_argument("--after", metavar="CURSOR", help="start after this cursor (default: first)")
    p.add_argument("--tenant", metavar="NAME_OR_ID", help="one tenant's events only")
    p.add_argument("--limit", type=int, metavar="N", help="at most N events (default: all)")
    p.set_defaults(handler=with_ledger(_export))

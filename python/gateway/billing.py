"""The billing documents: a usage event, a page of them and an invoice, as the billing API, the
gRPC usage service and the CLI give them.

One shape for all, so an export and the API's pages can be read by the same consumer. Token
classes are disjoint (`prompt_tokens` are the prompt tokens not served from cache, `cached_tokens`
those that were), money is integer micro-units of `currency`, and an event or invoice line of a
model that had no price is flagged (`priced: false`, no amount), never billed at zero. Nothing
here knows HTTP; only `event_page` reads the ledger.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import Field
from typing_extensions import TypedDict

from gateway.ledger.db import Connection
from gateway.ledger.invoices import Invoice, InvoiceLine
from gateway.ledger.usage import (
    TENANT_CURSOR_START,
    StoredEvent,
    decode_cursor,
    decode_tenant_cursor,
    encode_cursor,
    encode_tenant_cursor,
    events_after,
)

__all__ = [
    "EVENT_CSV_COLUMNS",
    "EventPage",
    "EventUsage",
    "InvoiceDocument",
    "UsageEventDocument",
    "cursor_after",
    "event_csv_row",
    "event_document",
    "event_page",
    "invoice_document",
    "resume_seq",
]

# Documents are TypedDicts: plain dicts to build and serialise (a page holds up to 10,000 events,
# served on the event loop of `gateway serve`), typed for mypy, and described for OpenAPI (whose
# schemas pydantic builds only from `typing_extensions.TypedDict` before Python 3.12). An
# invoice's lines are the ledger's dataclasses: `pydantic_core.to_jsonable_python` serialises it.


class EventUsage(TypedDict):
    """An event's tokens, in disjoint classes: their sum is every token of the request."""

    prompt_tokens: Annotated[int, Field(description="Prompt tokens not served from the cache.")]
    cached_tokens: Annotated[int, Field(description="Prompt tokens served from the prefix cache.")]
    completion_tokens: int


class UsageEventDocument(TypedDict):
    """One request's usage event, as the ledger stored and priced it."""

    id: Annotated[str, Field(description="The event id (UUIDv7); unique, the idempotency key.")]
    object: Literal["billing.usage_event"]
    request_id: Annotated[str, Field(description="The client's `X-Request-Id`, else the id.")]
    tenant_id: str
    api_key_id: str
    model: str
    worker: Annotated[
        str | None,
        Field(
            description="The worker that served it, if any; always null for a tenant reading "
            "its own events (an internal address)."
        ),
    ]
    endpoint: Annotated[
        str, Field(description="`chat.completions`, `completions` or `embeddings`.")
    ]
    stream: bool
    status: Annotated[str, Field(description="`completed`, `cancelled`, `failed`, `interrupted`.")]
    http_status: int
    usage: EventUsage
    usage_source: Annotated[
        str,
        Field(
            description="`worker` (the worker's usage), `gateway` (the worker reported none; the "
            "gateway counted with the worker's tokenizer) or `none` (nothing counted)."
        ),
    ]
    started_at_ms: Annotated[int, Field(description="Unix ms; priced and bucketed by it.")]
    finished_at_ms: int
    recorded_at_ms: Annotated[int, Field(description="Unix ms at which the ledger stored it.")]
    price_effective_at: Annotated[
        int | None, Field(description="`effective_at` of the price version used; null: unpriced.")
    ]
    cost_micros: Annotated[
        int | None,
        Field(description="Cost in micro-units of `currency`, rounded up; null: unpriced."),
    ]
    priced: Annotated[bool, Field(description="False when the model had no price at its start.")]
    currency: str


def event_document(
    event: StoredEvent, currency: str, *, tenant_view: bool = False
) -> UsageEventDocument:
    """The document of `event`; for `tenant_view` (a tenant reading its own events) without what
    tells of the fleet's insides: `worker` is null."""
    return UsageEventDocument(
        id=event.event_id,
        object="billing.usage_event",
        request_id=event.request_id,
        tenant_id=event.tenant_id,
        api_key_id=event.key_id,
        model=event.model,
        worker=None if tenant_view else event.worker,
        endpoint=event.endpoint,
        # SQLite hands BOOLEAN columns back as 0 or 1.
        stream=bool(event.stream),
        status=event.status,
        http_status=event.http_status,
        usage=EventUsage(
            prompt_tokens=event.prompt_tokens,
            cached_tokens=event.cached_tokens,
            completion_tokens=event.completion_tokens,
        ),
        usage_source=event.usage_source,
        started_at_ms=event.started_at_ms,
        finished_at_ms=event.finished_at_ms,
        recorded_at_ms=event.recorded_at_ms,
        price_effective_at=event.price_effective_at,
        cost_micros=event.cost_micros,
        priced=event.priced,
        currency=currency,
    )


class EventPage(TypedDict):
    """A page of usage events in commit order; follow `next_cursor` for the next one."""

    object: Literal["list"]
    data: list[UsageEventDocument]
    has_more: Annotated[bool, Field(description="Whether more events follow this page now.")]
    next_cursor: Annotated[
        str,
        Field(
            description="Where the next page starts: after this page's last event, or where this "
            "page began when it is empty. Always present: poll with it for new events. A page of "
            "one tenant's events has a cursor of that tenant's (`evt1.`), which encodes its last "
            "event's id and nothing of other tenants' events; a page of every tenant's, a cursor "
            "of the ledger's commit order (`evc1.`). Each kind is read only by its own kind of "
            "page."
        ),
    ]


def resume_seq(conn: Connection, after: str | None, tenant_id: str | None) -> int:
    """The `seq` after which a read of one tenant's events (`tenant_id`) or every tenant's
    resumes from the cursor `after` (the beginning if None); `ValueError` for a cursor that is not
    one this kind of read gave.

    A read of one tenant pages by a tenant cursor (`encode_tenant_cursor`): it moves only with
    that tenant's own events, so polling it tells nothing of other tenants'. A read of every
    tenant pages by the global commit order (`encode_cursor`)."""
    if after is None:
        return 0
    if tenant_id is None:
        return decode_cursor(after)
    return decode_tenant_cursor(conn, after, tenant_id)


def cursor_after(last: StoredEvent | None, after: str | None, tenant_id: str | None) -> str:
    """The cursor that resumes after `last`, the last event read; with none read, the cursor the
    read was given (`after`), or the kind's beginning."""
    if last is None:
        return after or (encode_cursor(0) if tenant_id is None else TENANT_CURSOR_START)
    return encode_cursor(last.seq) if tenant_id is None else encode_tenant_cursor(last.event_id)


def event_page(
    conn: Connection,
    after: str | None,
    limit: int,
    tenant_id: str | None,
    currency: str,
    *,
    tenant_view: bool = False,
) -> EventPage:
    """Up to `limit` events after the cursor `after` (the beginning if None), of one tenant or
    all (`resume_seq` says which cursors); `ValueError` for a cursor that is not one this kind of
    page gave. An empty page gives back the cursor it was given. `tenant_view`: documents as a
    tenant sees them (`event_document`)."""
    events = events_after(conn, resume_seq(conn, after, tenant_id), limit + 1, tenant_id)
    page = events[:limit]
    return EventPage(
        object="list",
        data=[event_document(event, currency, tenant_view=tenant_view) for event in page],
        has_more=len(events) > limit,
        next_cursor=cursor_after(page[-1] if page else None, after, tenant_id),
    )


EVENT_CSV_COLUMNS: tuple[str, ...] = tuple(
    column
    for name in UsageEventDocument.__annotations__
    if name != "object"
    for column in (EventUsage.__annotations__ if name == "usage" else (name,))
)
"""An event's CSV columns: the document's fields, with `usage` spread into its three classes."""


def event_csv_row(document: UsageEventDocument) -> dict[str, object]:
    """The document as one CSV row of `EVENT_CSV_COLUMNS` (usage spread out, `object` left out),
    booleans as in JSON (`true`, `false`) and nulls empty."""
    fields = {**document, **document["usage"]}
    return {
        column: "" if value is None else json.dumps(value) if isinstance(value, bool) else value
        for column in EVENT_CSV_COLUMNS
        for value in (fields[column],)
    }


class InvoiceDocument(TypedDict):
    """A tenant's invoice for one UTC month: one line per model, price version and token class."""

    object: Literal["billing.invoice"]
    tenant_id: str
    tenant_name: str
    period: Annotated[str, Field(description="The UTC month, `YYYY-MM`.")]
    currency: str
    start_ms: Annotated[int, Field(description="Start of the month, unix ms (inclusive).")]
    end_ms: Annotated[int, Field(description="End of the month, unix ms (exclusive).")]
    requests: int
    unpriced_requests: Annotated[int, Field(description="Requests of a model without a price.")]
    unpriced: Annotated[bool, Field(description="Whether some usage is not in the total.")]
    total_micros: Annotated[int, Field(description="Sum of the priced lines' amounts.")]
    lines: Annotated[
        list[InvoiceLine],
        Field(description="Amount: ceil(quantity x unit price / 1,000,000); null if unpriced."),
    ]


def invoice_document(invoice: Invoice, tenant_name: str, currency: str) -> InvoiceDocument:
    return InvoiceDocument(
        object="billing.invoice",
        tenant_id=invoice.tenant_id,
        tenant_name=tenant_name,
        period=invoice.period,
        currency=currency,
        start_ms=invoice.start_ms,
        end_ms=invoice.end_ms,
        requests=invoice.requests,
        unpriced_requests=invoice.unpriced_requests,
        unpriced=invoice.unpriced_requests > 0,
        total_micros=invoice.total_micros,
        lines=invoice.lines,
    )

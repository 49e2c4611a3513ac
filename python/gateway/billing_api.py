"""The billing HTTP API: usage events by cursor, usage in time buckets, and invoices, read from the
ledger; on the admin listener (`admin.create_app` mounts `router` and sets the app state read
here: `ledger`, `admin_token`, `billing_token`, `currency`).

Every route takes `Authorization: Bearer` with one of: the billing token or the admin token (every
tenant; `tenant` selects one), or a tenant's own API key, not revoked, of a tenant not disabled
(that tenant only: naming another is 403 `permission_denied`). Tokens are compared in constant
time. Errors have the OpenAI body (`http_common`); a bad parameter is 400 naming it in `param`,
and every parameter is bounded (times to year 9999, names to `bounds.MAX_NAME` characters).

Nothing here writes to the ledger.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Generic, Literal, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import Field
from pydantic_core import to_jsonable_python
from typing_extensions import TypedDict

from gateway.billing import EventPage, InvoiceDocument, event_page, invoice_document
from gateway.bounds import MAX_NAME, MAX_TIME_MS, PlainText
from gateway.http_common import ApiError, Ledger, openapi_document, token_matches
from gateway.keys import hash_key
from gateway.ledger.apikeys import list_keys, usable_key_tenant
from gateway.ledger.db import Connection, now_ms
from gateway.ledger.invoices import invoice, invoice_csv
from gateway.ledger.quotas import get_quota
from gateway.ledger.refusals import REFUSAL_GROUP_KEYS, RefusalGroupKey, refusal_page
from gateway.ledger.rollups import (
    BUCKET_LIMITS,
    BUCKET_WIDTHS,
    GROUP_KEYS,
    BucketResult,
    BucketWidth,
    GroupKey,
    UsagePage,
    Window,
    usage_page,
)
from gateway.ledger.tenants import Tenant, get_tenant_by_name_or_id
from gateway.ledger.usage import spent_in_current_periods
from gateway.quotas import Period, QuotaPolicy, Scope, period_bounds

__all__ = ["EVENTS_LIMIT", "OPENAPI_TITLE", "router"]

OPENAPI_TITLE = "tokengate billing API"

EVENTS_LIMIT = (100, 10_000)
"""Events per page of `/usage-events`: the default and the largest `limit`."""

# Times beyond year 9999 are refused before they reach the ledger.
_MAX_TIME_S = MAX_TIME_MS // 1000
# The longest cursor or page a page gives is far shorter.
_MAX_CURSOR = 512

_GROUP_ALIASES: dict[str, GroupKey] = {key: key for key in GROUP_KEYS} | {"tenant": "tenant_id"}
_REFUSAL_GROUP_ALIASES: dict[str, RefusalGroupKey] = {key: key for key in REFUSAL_GROUP_KEYS} | {
    "tenant": "tenant_id"
}
_K = TypeVar("_K", bound=str)
_R = TypeVar("_R")
_D = TypeVar("_D")


Role = Literal["admin", "billing", "tenant"]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the admin or billing token (`tenant` None), or a tenant's API key."""

    role: Role
    tenant: Tenant | None


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="BillingBearer",
    description="The billing token, the admin token, or a tenant's API key (its own data only).",
)


def _key_owner(conn: Connection, key: str) -> Tenant | None:
    """The tenant of a usable API key (the core's definition: not revoked, tenant not disabled),
    or None."""
    tenant_id = usable_key_tenant(conn, hash_key(key))
    return None if tenant_id is None else get_tenant_by_name_or_id(conn, tenant_id)


async def _caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    conn: Ledger,
) -> Caller:
    if credentials is None:
        raise ApiError(
            401,
            "missing credentials: send the billing token or an API key as "
            "`Authorization: Bearer <token>`",
            "missing_api_key",
        )
    token = credentials.credentials
    state = request.app.state
    # Both comparisons run whichever matches, so timing tells nothing about either token.
    billing = token_matches(token, state.billing_token)
    admin = token_matches(token, state.admin_token)
    if admin:
        return Caller(role="admin", tenant=None)
    if billing:
        return Caller(role="billing", tenant=None)
    tenant = _key_owner(conn, token)
    if tenant is None:
        raise ApiError(401, "invalid billing token or API key", "invalid_api_key")
    return Caller(role="tenant", tenant=tenant)


CallerDep = Annotated[Caller, Depends(_caller)]
TenantParam = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=MAX_NAME,
        description="A tenant's name or id. With a tenant's API key: its own (the default); "
        "with the billing or admin token: every tenant when left out.",
    ),
    PlainText,
]


def _scope(conn: Connection, caller: Caller, tenant: str | None) -> Tenant | None:
    """The tenant a request reads, None for all of them."""
    own = caller.tenant
    if own is None:
        return None if tenant is None else get_tenant_by_name_or_id(conn, tenant)
    if tenant is not None and tenant not in (own.id, own.name):
        raise ApiError(
            403,
            "an API key reads its own tenant's billing only",
            "permission_denied",
            "tenant",
        )
    return own


OneTenantParam = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=MAX_NAME,
        description="A tenant's name or id; required with the billing or admin token, the key's "
        "own tenant by default.",
    ),
    PlainText,
]


def _one_tenant(conn: Connection, caller: Caller, tenant: str | None) -> Tenant:
    """The one tenant a request reads: `_scope`'s, which a token must name."""
    scope = _scope(conn, caller, tenant)
    if scope is None:
        raise ApiError(400, "tenant: required with the billing or admin token", None, "tenant")
    return scope


router = APIRouter(prefix="/v1/billing", tags=["billing"])


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, caller: CallerDep) -> JSONResponse:
    return JSONResponse(openapi_document(request.app, router, OPENAPI_TITLE))


@router.get("/usage-events", response_model=EventPage)
async def usage_events(
    request: Request,
    conn: Ledger,
    caller: CallerDep,
    after: Annotated[
        str | None,
        Query(
            max_length=_MAX_CURSOR,
            description="A `next_cursor` from an earlier page of the same reader (one tenant's "
            "events, or every tenant's); the beginning if left out.",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=EVENTS_LIMIT[1])] = EVENTS_LIMIT[0],
    tenant: TenantParam = None,
) -> JSONResponse:
    """Usage events in the order the ledger committed them: paging with `next_cursor` sees every
    event exactly once, however many are written meanwhile.

    A read of one tenant (a tenant's API key, or a token with `tenant`) pages by a cursor of that
    tenant's own events, which no other tenant's traffic moves; a read of every tenant, by the
    ledger's commit order. A cursor of one kind is 400 for the other. A tenant's API key sees
    its events without `worker` (null)."""
    scope = _scope(conn, caller, tenant)
    currency: str = request.app.state.currency
    try:
        page = event_page(
            conn,
            after,
            limit,
            None if scope is None else scope.id,
            currency,
            tenant_view=caller.tenant is not None,
        )
    except ValueError as exc:
        raise ApiError(400, str(exc), None, "after") from None
    return JSONResponse(page)


class UsageResult(TypedDict):
    """The sums of one group in one bucket; a group key is null unless grouped by it."""

    object: Literal["organization.usage.completions.result"]
    input_tokens: Annotated[int, Field(description="Prompt tokens, cached ones included.")]
    input_cached_tokens: Annotated[int, Field(description="Prompt tokens served from cache.")]
    output_tokens: int
    num_model_requests: int
    tenant_id: str | None
    api_key_id: str | None
    model: str | None
    cost_micros: Annotated[int, Field(description="Cost of the priced requests, micro-units.")]
    unpriced_requests: Annotated[int, Field(description="Requests of a model without a price.")]
    failed_requests: Annotated[
        int,
        Field(description="Requests that ended in an error: the worker's, or a stream cut short."),
    ]
    currency: str


class BucketDocument(TypedDict, Generic[_D]):
    object: Literal["bucket"]
    start_time: Annotated[int, Field(description="Unix seconds, inclusive.")]
    end_time: Annotated[int, Field(description="Unix seconds, exclusive.")]
    results: list[_D]


class BucketPage(TypedDict, Generic[_D]):
    """Buckets in the shape of OpenAI's organisation usage page; `next_page` is the next
    `page`."""

    object: Literal["page"]
    data: list[BucketDocument[_D]]
    has_more: bool
    next_page: str | None


UsageBuckets = BucketPage[UsageResult]


_PAGE_PREFIX = "bkp1."


def _encode_page(start_ms: int) -> str:
    return _PAGE_PREFIX + base64.urlsafe_b64encode(start_ms.to_bytes(8, "big")).decode().rstrip("=")


def _decode_page(page: str) -> int:
    body = page.removeprefix(_PAGE_PREFIX)
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:  # binascii.Error included
        raw = b""
    if body == page or len(raw) != 8:
        raise ApiError(400, f"not a page of usage buckets: {page!r}", None, "page")
    return int.from_bytes(raw, "big")


def _group_keys(values: list[str], aliases: Mapping[str, _K]) -> list[_K]:
    keys: list[_K] = []
    for value in (part.strip() for item in values for part in item.split(",")):
        if not value:
            continue
        if value not in aliases:
            allowed = ", ".join(aliases)
            raise ApiError(400, f"cannot group by {value!r}: use {allowed}", None, "group_by")
        keys.append(aliases[value])
    return keys


async def _window(
    start_time: Annotated[
        int, Query(ge=0, le=_MAX_TIME_S, description="Unix seconds; its bucket is the first.")
    ],
    end_time: Annotated[
        int | None, Query(ge=0, le=_MAX_TIME_S, description="Unix seconds, exclusive; now.")
    ] = None,
    bucket_width: BucketWidth = "1d",
    limit: Annotated[
        int | None,
        Query(
            ge=1,
            le=max(most for _, most in BUCKET_LIMITS.values()),
            description="Buckets per page: 1m 60 (at most 1440), 1h 24 (168), 1d 7 (31).",
        ),
    ] = None,
    page: Annotated[
        str | None,
        Query(max_length=_MAX_CURSOR, description="The `next_page` of the previous page."),
    ] = None,
) -> Window:
    """The buckets a page of `/usage` or `/refusals` lists."""
    default, most = BUCKET_LIMITS[bucket_width]
    if limit is None:
        limit = default
    if not 1 <= limit <= most:
        raise ApiError(400, f"limit: 1 to {most} buckets of {bucket_width} per page", None, "limit")
    width_ms = BUCKET_WIDTHS[bucket_width]
    start_ms = start_time * 1000
    end_ms = now_ms() if end_time is None else end_time * 1000
    if end_ms <= start_ms:
        raise ApiError(400, "end_time must be after start_time", None, "end_time")
    if page is not None:
        from_ms = _decode_page(page)
        if from_ms % width_ms or not start_ms - start_ms % width_ms < from_ms < end_ms:
            raise ApiError(400, f"not a page of this query: {page!r}", None, "page")
        start_ms = from_ms
    return Window(bucket_width, start_ms, end_ms, limit)


WindowDep = Annotated[Window, Depends(_window)]


def _grouping(aliases: Mapping[str, _K], keys: str) -> Callable[..., Awaitable[list[_K]]]:
    """A dependency: the group keys of `group_by` and `group_by[]`, each one of `aliases`."""

    # Defaults, not `Annotated`: the annotations are strings, resolved in the module.
    async def grouping(
        group_by: list[str] | None = Query(  # noqa: B008
            None, description=f"Any of {keys}: repeated or comma-separated (`group_by[]` too)."
        ),
        group_by_brackets: list[str] | None = Query(  # noqa: B008
            None, alias="group_by[]", include_in_schema=False
        ),
    ) -> list[_K]:
        return _group_keys([*(group_by or []), *(group_by_brackets or [])], aliases)

    return grouping


UsageGroups = Annotated[
    list[GroupKey],
    Depends(_grouping(_GROUP_ALIASES, "`tenant_id` (or `tenant`), `api_key_id`, `model`")),
]
RefusalGroups = Annotated[
    list[RefusalGroupKey],
    Depends(_grouping(_REFUSAL_GROUP_ALIASES, "`tenant_id` (or `tenant`), `api_key_id`, `reason`")),
]


def _page(
    buckets: Iterable[tuple[int, int, Iterable[_R]]],
    next_start_ms: int | None,
    render: Callable[[_R], _D],
) -> BucketPage[_D]:
    """A page of `buckets` (start and end in ms, and their results, each rendered)."""
    return BucketPage(
        object="page",
        data=[
            BucketDocument(
                object="bucket",
                start_time=start_ms // 1000,
                end_time=end_ms // 1000,
                results=[render(result) for result in results],
            )
            for start_ms, end_ms, results in buckets
        ],
        has_more=next_start_ms is not None,
        next_page=None if next_start_ms is None else _encode_page(next_start_ms),
    )


def _buckets(page: UsagePage, currency: str) -> UsageBuckets:
    def render(result: BucketResult) -> UsageResult:
        return UsageResult(
            object="organization.usage.completions.result",
            input_tokens=result.prompt_tokens + result.cached_tokens,
            input_cached_tokens=result.cached_tokens,
            output_tokens=result.completion_tokens,
            num_model_requests=result.requests,
            tenant_id=result.tenant_id,
            api_key_id=result.api_key_id,
            model=result.model,
            cost_micros=result.cost_micros,
            unpriced_requests=result.unpriced_requests,
            failed_requests=result.failed_requests,
            currency=currency,
        )

    buckets = ((b.start_ms, b.end_ms, b.results) for b in page.buckets)
    return _page(buckets, page.next_start_ms, render)


@router.get("/usage", response_model=UsageBuckets)
async def usage(
    request: Request,
    conn: Ledger,
    caller: CallerDep,
    window: WindowDep,
    group_by: UsageGroups,
    tenant: TenantParam = None,
) -> JSONResponse:
    """Usage in UTC-aligned buckets from `start_time`'s to `end_time`, by the requests' start
    times, every bucket listed (empty ones too); the shape of OpenAI's organisation usage API."""
    scope = _scope(conn, caller, tenant)
    found = usage_page(
        conn,
        window.width,
        window.start_ms,
        window.end_ms,
        limit=window.limit,
        group_by=group_by,
        tenant_id=None if scope is None else scope.id,
    )
    return JSONResponse(_buckets(found, request.app.state.currency))


class RefusalResultDocument(TypedDict):
    """The refusals of one group in one bucket; a group key is null unless grouped by it."""

    object: Literal["billing.refusals.result"]
    requests: Annotated[int, Field(description="Requests refused.")]
    tenant_id: str | None
    api_key_id: str | None
    reason: Annotated[
        str | None,
        Field(description="The error's code: `rate_limit_exceeded`, `insufficient_quota`, ..."),
    ]


RefusalBuckets = BucketPage[RefusalResultDocument]


@router.get("/refusals", response_model=RefusalBuckets)
async def refusals(
    conn: Ledger,
    caller: CallerDep,
    window: WindowDep,
    group_by: RefusalGroups,
    tenant: TenantParam = None,
) -> JSONResponse:
    """Requests refused after their key was accepted (429s over a quota among them), in the
    buckets `/usage` lists, by the time the gateway handed the counts to the ledger (within a
    second of the refusal)."""
    scope = _scope(conn, caller, tenant)
    found = refusal_page(
        conn,
        window.width,
        window.start_ms,
        window.end_ms,
        limit=window.limit,
        group_by=group_by,
        tenant_id=None if scope is None else scope.id,
    )
    buckets = ((b.start_ms, b.end_ms, b.results) for b in found.buckets)
    page = _page(
        buckets,
        found.next_start_ms,
        lambda result: RefusalResultDocument(
            object="billing.refusals.result",
            requests=result.requests,
            tenant_id=result.tenant_id,
            api_key_id=result.api_key_id,
            reason=result.reason,
        ),
    )
    return JSONResponse(page)


def _wants_csv(request: Request, format_: str | None) -> bool:
    if format_ is not None:
        return format_ == "csv"
    accepted = request.headers.get("accept", "")
    return any(part.split(";")[0].strip() == "text/csv" for part in accepted.split(","))


@router.get(
    "/invoices",
    response_model=InvoiceDocument,
    responses={200: {"content": {"text/csv": {}}, "description": "The invoice, or its CSV."}},
)
async def invoices(
    request: Request,
    conn: Ledger,
    caller: CallerDep,
    period: Annotated[str, Query(max_length=16, description="The UTC month, `YYYY-MM`.")],
    tenant: OneTenantParam = None,
    format_: Annotated[
        Literal["json", "csv"] | None,
        Query(alias="format", description="Default JSON, or CSV if `Accept: text/csv`."),
    ] = None,
) -> Response:
    """A tenant's invoice for a UTC month: a line per model, price version and token class."""
    scope = _one_tenant(conn, caller, tenant)
    try:
        found = invoice(conn, scope.id, period)
    except (ValueError, OverflowError):  # a month past the calendar's range overflows
        raise ApiError(400, f"a period is a month, YYYY-MM: {period!r}", None, "period") from None
    if _wants_csv(request, format_):
        filename = f"invoice-{scope.name}-{period}.csv"
        return Response(
            invoice_csv(found),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    document = invoice_document(found, scope.name, request.app.state.currency)
    return JSONResponse(to_jsonable_python(document))


class CallerDocument(TypedDict):
    """Who the credentials are: what the console shows, and which routes it may call."""

    object: Literal["billing.caller"]
    role: Annotated[
        Role,
        Field(
            description="`admin` (the admin token: every route), `billing` (the billing token: "
            "every tenant's billing), `tenant` (an API key: its own tenant's billing)."
        ),
    ]
    tenant_id: Annotated[str | None, Field(description="The key's tenant; null for a token.")]
    tenant_name: str | None
    currency: str


@router.get("/me", response_model=CallerDocument)
async def me(request: Request, caller: CallerDep) -> JSONResponse:
    """Who the presented credentials are."""
    own = caller.tenant
    return JSONResponse(
        CallerDocument(
            object="billing.caller",
            role=caller.role,
            tenant_id=None if own is None else own.id,
            tenant_name=None if own is None else own.name,
            currency=request.app.state.currency,
        )
    )


class KeyDocument(TypedDict):
    """An API key as its tenant sees it: never the secret, never its hash."""

    object: Literal["billing.api_key"]
    id: str
    tenant_id: str
    name: str | None
    prefix: Annotated[str, Field(description="The key's first characters, to recognise it.")]
    created_at: Annotated[int, Field(description="Unix seconds.")]
    revoked_at: Annotated[int | None, Field(description="Unix seconds; null while usable.")]


class KeyList(TypedDict):
    object: Literal["list"]
    data: list[KeyDocument]


@router.get("/keys", response_model=KeyList)
async def keys(conn: Ledger, caller: CallerDep, tenant: TenantParam = None) -> JSONResponse:
    """A tenant's API keys, revoked ones included, by creation time; every tenant's with a token
    and no `tenant`. Their usage is `/usage` grouped by `api_key_id`."""
    scope = _scope(conn, caller, tenant)
    return JSONResponse(
        KeyList(
            object="list",
            data=[
                KeyDocument(
                    object="billing.api_key",
                    id=key.id,
                    tenant_id=key.tenant_id,
                    name=key.name,
                    prefix=key.prefix,
                    created_at=key.created_at // 1000,
                    revoked_at=None if key.revoked_at is None else key.revoked_at // 1000,
                )
                for key in list_keys(conn, None if scope is None else scope.id)
            ],
        )
    )


class BudgetDocument(TypedDict):
    """One budget of a policy in its current period."""

    kind: Annotated[
        Literal["tokens", "money"],
        Field(description="Tokens (prompt plus completion), or money in micro-units."),
    ]
    period: Period
    period_start: Annotated[int, Field(description="Unix seconds, inclusive.")]
    period_end: Annotated[int, Field(description="Unix seconds, exclusive.")]
    limit: int
    spent: Annotated[
        int, Field(description="What the ledger holds for the period (requests that ended).")
    ]
    remaining: Annotated[int, Field(description="`limit - spent`, never below 0.")]


class SubjectQuotaDocument(TypedDict):
    """The policy of the tenant, or of one of its keys, and its budgets now."""

    scope: Scope
    id: str
    name: Annotated[str | None, Field(description="The tenant's name, or the key's.")]
    policy: QuotaPolicy
    budgets: list[BudgetDocument]


class QuotaDocument(TypedDict):
    """A tenant's quota policies: its own first (if it has one), then its keys' that have one."""

    object: Literal["billing.quota"]
    tenant_id: str
    tenant_name: str
    currency: str
    data: list[SubjectQuotaDocument]


def _budgets(policy: QuotaPolicy, spent: Mapping[str, int], at_ms: int) -> list[BudgetDocument]:
    start_ms, end_ms = period_bounds(policy.budget_period, at_ms)
    budgets: list[BudgetDocument] = []
    for kind, limit in (("tokens", policy.token_budget), ("money", policy.money_budget_micros)):
        if limit is None:
            continue
        used = spent.get(kind, 0)
        budgets.append(
            BudgetDocument(
                kind="tokens" if kind == "tokens" else "money",
                period=policy.budget_period,
                period_start=start_ms // 1000,
                period_end=end_ms // 1000,
                limit=limit,
                spent=used,
                remaining=max(limit - used, 0),
            )
        )
    return budgets


@router.get("/quota", response_model=QuotaDocument)
async def quota(
    request: Request,
    conn: Ledger,
    caller: CallerDep,
    tenant: OneTenantParam = None,
) -> JSONResponse:
    """A tenant's quota policies and what remains of each budget in its current UTC day or
    month, by what the ledger holds (the gateway also holds back what requests in flight may
    still spend)."""
    scope = _one_tenant(conn, caller, tenant)
    at_ms = now_ms()
    spent: dict[tuple[str, str], dict[str, int]] = {}
    for entry in spent_in_current_periods(conn, at_ms, scope.id):
        spent[entry["id"], entry["period"]] = {
            "tokens": entry["tokens"],
            "money": entry["money_micros"],
        }
    subjects: list[tuple[Scope, str, str | None]] = [("tenant", scope.id, scope.name)]
    subjects += [("key", key.id, key.name) for key in list_keys(conn, scope.id)]
    data: list[SubjectQuotaDocument] = []
    for kind, subject_id, name in subjects:
        policy = get_quota(conn, subject_id)
        if policy is None:
            continue
        used = spent.get((subject_id, policy.budget_period), {})
        data.append(
            SubjectQuotaDocument(
                scope=kind,
                id=subject_id,
                name=name,
                policy=policy,
                budgets=_budgets(policy, used, at_ms),
            )
        )
    document = QuotaDocument(
        object="billing.quota",
        tenant_id=scope.id,
        tenant_name=scope.name,
        currency=request.app.state.currency,
        data=data,
    )
    return JSONResponse(to_jsonable_python(document))

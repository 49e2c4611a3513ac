"""The admin HTTP API: tenants, keys, quota policies and prices in the ledger, for operators; and
the listener it shares with the billing API (`billing_api`).

Routes live under `/admin/v1`; every one of them, the OpenAPI document at `/admin/v1/openapi.json`
included, requires `Authorization: Bearer <admin token>`, compared in constant time (the billing
token opens none of them). Every error has the OpenAI body `{"error": {"message", "type", "param",
"code"}}` (`http_common`): 400 invalid input (`param` names the field), 401 missing or wrong token,
404 unknown tenant, key, quota or route, 405 wrong method, 409 conflict, 503 database unavailable.
Every integer and string a client sends has a bound (`gateway.bounds`; strings without control
characters): past it, 400 naming the field.

Handlers are `async def` and use the one ledger connection of `gateway serve` on its event loop's
thread, like the key and usage loops: statements are short and none spans an `await`. A change
reaches the core with the next snapshot push (`control.key_refresh_ms`); nothing here enforces it.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from gateway import billing_api
from gateway.bounds import MAX_MODEL_NAME, MAX_NAME, MAX_TIME_MS, PlainText
from gateway.config import AdminConfig, BillingConfig, ServerConfig, listen_address
from gateway.console import mount_console
from gateway.http_common import (
    ApiError,
    Ledger,
    new_app,
    openapi_document,
    token_matches,
)
from gateway.http_protocol import bounded_h11
from gateway.ledger.apikeys import ApiKey, create_key, get_key, list_keys, revoke_key
from gateway.ledger.changes import Change, recent_changes
from gateway.ledger.db import Connection
from gateway.ledger.prices import PriceVersion, list_prices, set_price
from gateway.ledger.quotas import clear_quota, get_quota, set_key_quota, set_tenant_quota
from gateway.ledger.tenants import (
    Tenant,
    create_tenant,
    get_tenant_by_name_or_id,
    list_tenants,
    set_tenant_disabled,
)
from gateway.quotas import Price, QuotaPolicy
from gateway.reload import ReloadRefusedError
from gateway.telemetry import Telemetry, instrument

__all__ = ["OPENAPI_TITLE", "AdminServer", "bind_admin", "create_app", "router"]

OPENAPI_TITLE = "tokengate admin API"

# How long open admin connections may take to finish once `gateway serve` stops.
STOP_TIMEOUT_S = 5

_T = TypeVar("_T")

_bearer = HTTPBearer(auto_error=False, description="The admin token (`[admin] token_env`).")


async def _authorize(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if credentials is None:
        raise ApiError(
            401,
            "missing admin token: send it as `Authorization: Bearer <token>`",
            "missing_admin_token",
        )
    # No admin token set (only the billing token): every token is wrong here.
    if not token_matches(credentials.credentials, request.app.state.admin_token):
        raise ApiError(401, "invalid admin token", "invalid_admin_token")


class Listing(BaseModel, Generic[_T]):
    """A list response."""

    data: list[_T]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class NewTenant(_Body):
    name: str = Field(
        min_length=1, max_length=64, description="1-64 letters, digits, `.`, `_`, `-`; unique."
    )


class TenantChange(_Body):
    disabled: bool = Field(description="A disabled tenant's keys are refused.")


class NewKey(_Body):
    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME), PlainText] | None = Field(
        default=None, description=f"A label for the key, at most {MAX_NAME} characters."
    )


class NewPrice(Price):
    effective_at: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TIME_MS,
        description="Unix milliseconds from which it applies (at most the end of year 9999); "
        "default now.",
    )


# Path parameters: a tenant (name or id), a key id, a model name.
TenantRef = Annotated[
    str,
    Path(min_length=1, max_length=MAX_NAME, description="A tenant's name or id."),
    PlainText,
]
KeyRef = Annotated[
    str, Path(min_length=1, max_length=MAX_NAME, description="A key's id (`key_...`)."), PlainText
]
ModelRef = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_MODEL_NAME,
        description=f"A model's name, 1-{MAX_MODEL_NAME} characters.",
    ),
    PlainText,
]


@dataclass(frozen=True, slots=True)
class IssuedKey(ApiKey):
    """A new key: its record and the secret `key`, returned this once and never again."""

    key: str = dataclasses.field(repr=False)


router = APIRouter(prefix="/admin/v1", dependencies=[Depends(_authorize)])


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(openapi_document(request.app, router, OPENAPI_TITLE))


@router.post("/tenants", status_code=201, tags=["tenants"])
async def post_tenant(body: NewTenant, conn: Ledger) -> Tenant:
    """Creates a tenant."""
    return create_tenant(conn, body.name)


@router.get("/tenants", tags=["tenants"])
async def get_tenants(conn: Ledger) -> Listing[Tenant]:
    """Every tenant, by name."""
    return Listing(data=list_tenants(conn))


@router.get("/tenants/{tenant}", tags=["tenants"])
async def get_tenant(tenant: TenantRef, conn: Ledger) -> Tenant:
    """One tenant, by name or id."""
    return get_tenant_by_name_or_id(conn, tenant)


@router.patch("/tenants/{tenant}", tags=["tenants"])
async def patch_tenant(tenant: TenantRef, body: TenantChange, conn: Ledger) -> Tenant:
    """Disables or re-enables a tenant and, with it, every one of its keys."""
    return set_tenant_disabled(conn, get_tenant_by_name_or_id(conn, tenant).id, body.disabled)


@router.post("/tenants/{tenant}/keys", status_code=201, tags=["keys"])
async def post_key(tenant: TenantRef, conn: Ledger, body: NewKey | None = None) -> IssuedKey:
    """Issues a key; the response holds the secret, which is not shown again."""
    created = create_key(conn, tenant, name=body.name if body else None)
    return IssuedKey(**dataclasses.asdict(created.record), key=created.key)


@router.get("/tenants/{tenant}/keys", tags=["keys"])
async def get_keys(tenant: TenantRef, conn: Ledger) -> Listing[ApiKey]:
    """A tenant's keys, revoked ones included; never their secrets."""
    return Listing(data=list_keys(conn, get_tenant_by_name_or_id(conn, tenant).id))


@router.delete("/keys/{key_id}", tags=["keys"])
async def delete_key(key_id: KeyRef, conn: Ledger) -> ApiKey:
    """Revokes a key (again: keeps the first revocation time)."""
    get_key(conn, key_id)
    return revoke_key(conn, key_id)


def _quota(conn: Connection, subject_id: str) -> QuotaPolicy:
    policy = get_quota(conn, subject_id)
    if policy is None:
        raise ApiError(404, f"{subject_id} has no quota (it is unlimited)", "quota_not_found")
    return policy


@router.put("/tenants/{tenant}/quota", tags=["quotas"])
async def put_tenant_quota(tenant: TenantRef, policy: QuotaPolicy, conn: Ledger) -> QuotaPolicy:
    """Replaces a tenant's whole policy: limits left out are lifted."""
    set_tenant_quota(conn, tenant, policy)
    return policy


@router.get("/tenants/{tenant}/quota", tags=["quotas"])
async def get_tenant_quota(tenant: TenantRef, conn: Ledger) -> QuotaPolicy:
    """A tenant's policy; 404 `quota_not_found` if it has none."""
    return _quota(conn, get_tenant_by_name_or_id(conn, tenant).id)


@router.delete("/tenants/{tenant}/quota", status_code=204, tags=["quotas"])
async def delete_tenant_quota(tenant: TenantRef, conn: Ledger) -> None:
    """Removes a tenant's policy, if any: the tenant becomes unlimited."""
    clear_quota(conn, get_tenant_by_name_or_id(conn, tenant).id)


@router.put("/keys/{key_id}/quota", tags=["quotas"])
async def put_key_quota(key_id: KeyRef, policy: QuotaPolicy, conn: Ledger) -> QuotaPolicy:
    """Replaces a key's whole policy (applied on top of its tenant's)."""
    set_key_quota(conn, key_id, policy)
    return policy


@router.get("/keys/{key_id}/quota", tags=["quotas"])
async def get_key_quota(key_id: KeyRef, conn: Ledger) -> QuotaPolicy:
    """A key's policy; 404 `quota_not_found` if it has none."""
    return _quota(conn, get_key(conn, key_id).id)


@router.delete("/keys/{key_id}/quota", status_code=204, tags=["quotas"])
async def delete_key_quota(key_id: KeyRef, conn: Ledger) -> None:
    """Removes a key's policy, if any."""
    clear_quota(conn, get_key(conn, key_id).id)


@router.put("/prices/{model:path}", status_code=201, tags=["prices"])
async def put_price(model: ModelRef, body: NewPrice, conn: Ledger) -> PriceVersion:
    """Adds a version of a model's prices (micro-units per million tokens); 409 if one is
    already effective at that exact time."""
    return set_price(conn, model, body, body.effective_at)


@router.get("/prices", tags=["prices"])
async def get_prices(conn: Ledger) -> Listing[PriceVersion]:
    """Every price version, by model then effective time."""
    return Listing(data=list_prices(conn))


class Reloaded(BaseModel):
    """What a reload applied."""

    workers: int = Field(description="Workers in the fleet now (new ones until probed too).")
    added: int = Field(description="Workers that joined; in rotation once their probe passes.")
    removed: int = Field(description="Workers that left; their requests in flight finish.")
    restart_required: list[str] = Field(
        description="Options the file changes that keep their running value until a restart."
    )


@router.post("/reload", tags=["configuration"])
async def post_reload(request: Request) -> Reloaded:
    """Reads the configuration file again and applies it (as SIGHUP does); 400
    `invalid_config`, naming the option at fault, if the file is invalid: the running
    configuration stays."""
    reload: Callable[[], Awaitable[dict[str, Any]]] | None = request.app.state.reload
    if reload is None:
        raise ApiError(404, "this admin API has no configuration file to reload", "no_reload")
    try:
        return Reloaded.model_validate(await reload())
    except ReloadRefusedError as exc:
        raise ApiError(400, str(exc), "invalid_config") from exc


class FleetWorkerLoad(BaseModel):
    """What a worker reported at its last load scrape (vLLM's own gauges)."""

    running: int = Field(description="`vllm:num_requests_running`.")
    waiting: int = Field(description="`vllm:num_requests_waiting`.")
    kv_cache_usage: float = Field(description="`vllm:kv_cache_usage_perc`, 0 to 1.")


class FleetWorker(BaseModel):
    """A worker as the gateway sees it now."""

    url: str
    healthy: bool = Field(description="Its health probes pass.")
    ejected: bool = Field(description="Out of rotation by its circuit breaker now.")
    ejections: int = Field(description="Times its circuit breaker ejected it since the start.")
    outstanding: int = Field(description="The gateway's requests on it now.")
    capacity: int | None = Field(description="The requests it takes at once; null: unbounded.")
    models: list[str]
    load: FleetWorkerLoad | None = Field(description="Null before a load scrape succeeded.")


class FleetQueue(BaseModel):
    """One tenant's requests waiting in one priority class of one model's queue."""

    model: str
    tenant_id: str
    class_: str = Field(alias="class", description="`interactive` or `batch`.")
    count: int


class Fleet(BaseModel):
    """The workers and the gateway's queues, now."""

    workers: list[FleetWorker]
    queues: list[FleetQueue]


@router.get("/fleet", tags=["fleet"], response_model_by_alias=True)
async def get_fleet(request: Request) -> Fleet:
    """Each worker's health, circuit breaker, requests and reported load, and the requests
    waiting in the gateway's queues, by model, tenant and class."""
    fleet: Callable[[], dict[str, Any]] | None = request.app.state.fleet
    if fleet is None:
        raise ApiError(404, "this admin API serves no gateway", "no_fleet")
    return Fleet.model_validate(fleet())


@router.get("/changes", tags=["changes"])
async def get_changes(
    conn: Ledger,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    tenant: Annotated[
        str | None,
        Query(min_length=1, max_length=MAX_NAME, description="A tenant's name or id."),
        PlainText,
    ] = None,
) -> Listing[Change]:
    """The latest changes to tenants, keys, quota policies and prices, newest first; of one
    tenant (its keys and policies) with `tenant`."""
    tenant_id = None if tenant is None else get_tenant_by_name_or_id(conn, tenant).id
    return Listing(data=recent_changes(conn, limit, tenant_id))


def create_app(
    conn: Connection,
    token: str | None,
    billing_token: str | None = None,
    billing: BillingConfig | None = None,
    reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    *,
    fleet: Callable[[], dict[str, Any]] | None = None,
    console: bool = False,
) -> FastAPI:
    """The admin API, for callers presenting `token`, and the billing API (`billing_api`), for
    callers presenting `billing_token`, `token` or a tenant's API key, over `conn`; requests must
    run on the thread that owns `conn`. A token left empty opens nothing: with no admin token, the
    admin routes answer 401. `reload` serves `POST /admin/v1/reload` (`gateway.reload`), `fleet`
    (the workers and queues, as `Fleet`'s fields) `GET /admin/v1/fleet`; with `console`, the
    browser console (`gateway.console`) is served at `/console/`."""
    if not token and not billing_token:
        raise ValueError("the admin token must not be empty when there is no billing token")
    app = new_app(conn, OPENAPI_TITLE)
    app.state.admin_token = token.encode() if token else None
    app.state.billing_token = billing_token.encode() if billing_token else None
    app.state.currency = (billing or BillingConfig()).currency
    app.state.reload = reload
    app.state.fleet = fleet
    app.include_router(router)
    app.include_router(billing_api.router)
    if console:
        mount_console(app)
    return app


class AdminServer(uvicorn.Server):
    """The admin API's HTTP server, run on the caller's event loop over a socket already bound.

    It leaves SIGINT and SIGTERM to its caller (`gateway serve`), prints `admin API listening on
    http://HOST:PORT` once it accepts, and stops when `should_exit` is set. A client has
    `server.header_read_timeout_ms` for a request's headers (an idle keep-alive connection too)
    and `server.body_read_timeout_ms` for its body (`_TimedH11Protocol`).
    """

    def __init__(self, app: FastAPI, sock: socket.socket, server: ServerConfig) -> None:
        header_timeout_s = server.header_read_timeout_ms / 1000
        super().__init__(
            uvicorn.Config(
                app,
                http=bounded_h11(header_timeout_s, server.body_read_timeout_ms / 1000),
                ws="none",
                lifespan="off",
                log_config=None,
                timeout_graceful_shutdown=STOP_TIMEOUT_S,
                # uvicorn's own bound on an idle connection, never shorter than ours.
                timeout_keep_alive=math.ceil(header_timeout_s),
            )
        )
        self._sock = sock

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own handlers would replace those of `gateway serve`, which drain the core.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"admin API listening on http://{listen_address(*self.address)}", flush=True)

    async def serve_until_stopped(self) -> None:
        """Serves until `should_exit` is set, then closes the socket."""
        await self.serve([self._sock])


def bind_admin(
    conn: Connection,
    config: AdminConfig,
    token: str | None,
    billing_token: str | None = None,
    billing: BillingConfig | None = None,
    server: ServerConfig | None = None,
    telemetry: Telemetry | None = None,
    reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    fleet: Callable[[], dict[str, Any]] | None = None,
) -> AdminServer:
    """Binds the admin listener (OSError if it cannot) and returns its server, not yet serving;
    `create_app` says what it serves (the console if `config.console`), `server` (its read
    timeouts) how long a client may take; with `telemetry` on, each request is traced."""
    app = create_app(
        conn, token, billing_token, billing, reload, fleet=fleet, console=config.console
    )
    if telemetry is not None:
        instrument(app, telemetry)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.create_server((config.host, config.port), family=family)
    return AdminServer(app, sock, server or ServerConfig())

"""The admin HTTP API: tenants, keys, quota policies and prices in the ledger, for operators.

Routes live under `/admin/v1`; every one of them, the OpenAPI document at `/admin/v1/openapi.json`
included, requires `Authorization: Bearer <admin token>`, compared in constant time. Every error
has the OpenAI body `{"error": {"message", "type", "param", "code"}}`: 400 invalid input (`param`
names the field), 401 missing or wrong token, 404 unknown tenant, key, quota or route, 405 wrong
method, 409 conflict, 503 database unavailable.

Handlers are `async def` and use the one ledger connection of `gateway serve` on its event loop's
thread, like the key and usage loops: statements are short and none spans an `await`. A change
reaches the core with the next snapshot push (`control.key_refresh_ms`); nothing here enforces it.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Generic, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

import gateway
from gateway.config import AdminConfig, describe_error, listen_address
from gateway.ledger.apikeys import ApiKey, create_key, get_key, list_keys, revoke_key
from gateway.ledger.db import (
    ConflictError,
    Connection,
    DatabaseError,
    LedgerError,
    NotFoundError,
)
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

__all__ = ["AdminServer", "bind_admin", "create_app"]

logger = logging.getLogger(__name__)

# How long open admin connections may take to finish once `gateway serve` stops.
STOP_TIMEOUT_S = 5

_T = TypeVar("_T")


class AdminError(Exception):
    """An error answered as is: HTTP status, message, OpenAI `code` and `param`."""

    def __init__(
        self, status: int, message: str, code: str | None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


def _error(error: AdminError) -> JSONResponse:
    kind = "invalid_request_error" if error.status < 500 else "service_unavailable"
    body = {"message": str(error), "type": kind, "param": error.param, "code": error.code}
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse({"error": body}, status_code=error.status, headers=headers)


def _as_admin_error(exc: Exception) -> AdminError:
    """The answer to an exception a handler or FastAPI raised."""
    if isinstance(exc, AdminError):
        return exc
    if isinstance(exc, NotFoundError):
        return AdminError(404, str(exc), "not_found")
    if isinstance(exc, ConflictError):
        return AdminError(409, str(exc), "conflict")
    if isinstance(exc, LedgerError):
        return AdminError(400, str(exc), None)
    if isinstance(exc, RequestValidationError):
        for item in exc.errors():
            if item["type"] == "json_invalid":
                reason = item.get("ctx", {}).get("error", "")
                return AdminError(400, f"the request body is not valid JSON: {reason}", None)
        problems = [describe_error(item) for item in exc.errors()]
        # A location starts with where the value came from (body, path, query): not a field.
        fields = [path.partition(".")[2] for path, _ in problems]
        message = "; ".join(
            f"{field or path}: {text}" for field, (path, text) in zip(fields, problems, strict=True)
        )
        return AdminError(400, message, None, (fields[0] or None) if fields else None)
    if isinstance(exc, HTTPException):
        code = {404: "unknown_route", 405: "method_not_allowed"}.get(exc.status_code)
        return AdminError(exc.status_code, str(exc.detail), code)
    if isinstance(exc, DatabaseError):
        logger.error("admin API: database error: %s", exc)
        return AdminError(503, "the ledger database is unavailable; retry", "database_unavailable")
    raise TypeError(f"no answer for {exc!r}")


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    return _error(_as_admin_error(exc))


_bearer = HTTPBearer(auto_error=False, description="The admin token (`[admin] token_env`).")


async def _authorize(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if credentials is None:
        raise AdminError(
            401,
            "missing admin token: send it as `Authorization: Bearer <token>`",
            "missing_admin_token",
        )
    token: bytes = request.app.state.admin_token
    if not hmac.compare_digest(credentials.credentials.encode(), token):
        raise AdminError(401, "invalid admin token", "invalid_admin_token")


async def _ledger(request: Request) -> Connection:
    conn: Connection = request.app.state.ledger
    return conn


Ledger = Annotated[Connection, Depends(_ledger)]


class Listing(BaseModel, Generic[_T]):
    """A list response."""

    data: list[_T]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class NewTenant(_Body):
    name: str = Field(description="1-64 letters, digits, `.`, `_`, `-`; unique.")


class TenantChange(_Body):
    disabled: bool = Field(description="A disabled tenant's keys are refused.")


class NewKey(_Body):
    name: str | None = Field(default=None, min_length=1, description="A label for the key.")


class NewPrice(Price):
    effective_at: int | None = Field(
        default=None, ge=0, description="Unix milliseconds from which it applies; default now."
    )


@dataclass(frozen=True, slots=True)
class IssuedKey(ApiKey):
    """A new key: its record and the secret `key`, returned this once and never again."""

    key: str = dataclasses.field(repr=False)


router = APIRouter(prefix="/admin/v1", dependencies=[Depends(_authorize)])


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.post("/tenants", status_code=201, tags=["tenants"])
async def post_tenant(body: NewTenant, conn: Ledger) -> Tenant:
    """Creates a tenant."""
    return create_tenant(conn, body.name)


@router.get("/tenants", tags=["tenants"])
async def get_tenants(conn: Ledger) -> Listing[Tenant]:
    """Every tenant, by name."""
    return Listing(data=list_tenants(conn))


@router.get("/tenants/{tenant}", tags=["tenants"])
async def get_tenant(tenant: str, conn: Ledger) -> Tenant:
    """One tenant, by name or id."""
    return get_tenant_by_name_or_id(conn, tenant)


@router.patch("/tenants/{tenant}", tags=["tenants"])
async def patch_tenant(tenant: str, body: TenantChange, conn: Ledger) -> Tenant:
    """Disables or re-enables a tenant and, with it, every one of its keys."""
    return set_tenant_disabled(conn, get_tenant_by_name_or_id(conn, tenant).id, body.disabled)


@router.post("/tenants/{tenant}/keys", status_code=201, tags=["keys"])
async def post_key(tenant: str, conn: Ledger, body: NewKey | None = None) -> IssuedKey:
    """Issues a key; the response holds the secret, which is not shown again."""
    created = create_key(conn, tenant, name=body.name if body else None)
    return IssuedKey(**dataclasses.asdict(created.record), key=created.key)


@router.get("/tenants/{tenant}/keys", tags=["keys"])
async def get_keys(tenant: str, conn: Ledger) -> Listing[ApiKey]:
    """A tenant's keys, revoked ones included; never their secrets."""
    return Listing(data=list_keys(conn, get_tenant_by_name_or_id(conn, tenant).id))


@router.delete("/keys/{key_id}", tags=["keys"])
async def delete_key(key_id: str, conn: Ledger) -> ApiKey:
    """Revokes a key (again: keeps the first revocation time)."""
    get_key(conn, key_id)
    return revoke_key(conn, key_id)


def _quota(conn: Connection, subject_id: str) -> QuotaPolicy:
    policy = get_quota(conn, subject_id)
    if policy is None:
        raise AdminError(404, f"{subject_id} has no quota (it is unlimited)", "quota_not_found")
    return policy


@router.put("/tenants/{tenant}/quota", tags=["quotas"])
async def put_tenant_quota(tenant: str, policy: QuotaPolicy, conn: Ledger) -> QuotaPolicy:
    """Replaces a tenant's whole policy: limits left out are lifted."""
    set_tenant_quota(conn, tenant, policy)
    return policy


@router.get("/tenants/{tenant}/quota", tags=["quotas"])
async def get_tenant_quota(tenant: str, conn: Ledger) -> QuotaPolicy:
    """A tenant's policy; 404 `quota_not_found` if it has none."""
    return _quota(conn, get_tenant_by_name_or_id(conn, tenant).id)


@router.delete("/tenants/{tenant}/quota", status_code=204, tags=["quotas"])
async def delete_tenant_quota(tenant: str, conn: Ledger) -> None:
    """Removes a tenant's policy, if any: the tenant becomes unlimited."""
    clear_quota(conn, get_tenant_by_name_or_id(conn, tenant).id)


@router.put("/keys/{key_id}/quota", tags=["quotas"])
async def put_key_quota(key_id: str, policy: QuotaPolicy, conn: Ledger) -> QuotaPolicy:
    """Replaces a key's whole policy (applied on top of its tenant's)."""
    set_key_quota(conn, key_id, policy)
    return policy


@router.get("/keys/{key_id}/quota", tags=["quotas"])
async def get_key_quota(key_id: str, conn: Ledger) -> QuotaPolicy:
    """A key's policy; 404 `quota_not_found` if it has none."""
    return _quota(conn, get_key(conn, key_id).id)


@router.delete("/keys/{key_id}/quota", status_code=204, tags=["quotas"])
async def delete_key_quota(key_id: str, conn: Ledger) -> None:
    """Removes a key's policy, if any."""
    clear_quota(conn, get_key(conn, key_id).id)


@router.put("/prices/{model:path}", status_code=201, tags=["prices"])
async def put_price(model: str, body: NewPrice, conn: Ledger) -> PriceVersion:
    """Adds a version of a model's prices (micro-units per million tokens); 409 if one is
    already effective at that exact time."""
    return set_price(conn, model, body, body.effective_at)


@router.get("/prices", tags=["prices"])
async def get_prices(conn: Ledger) -> Listing[PriceVersion]:
    """Every price version, by model then effective time."""
    return Listing(data=list_prices(conn))


def create_app(conn: Connection, token: str) -> FastAPI:
    """The admin API over `conn`, for callers presenting `token`; requests must run on the thread
    that owns `conn`."""
    if not token:
        raise ValueError("the admin token must not be empty")
    app = FastAPI(
        title="tokengate admin API",
        version=gateway.__version__,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.ledger = conn
    app.state.admin_token = token.encode()
    app.include_router(router)
    for error in (AdminError, LedgerError, RequestValidationError, HTTPException, DatabaseError):
        app.add_exception_handler(error, _handle)
    return app


class AdminServer(uvicorn.Server):
    """The admin API's HTTP server, run on the caller's event loop over a socket already bound.

    It leaves SIGINT and SIGTERM to its caller (`gateway serve`), prints `admin API listening on
    http://HOST:PORT` once it accepts, and stops when `should_exit` is set.
    """

    def __init__(self, app: FastAPI, sock: socket.socket) -> None:
        super().__init__(
            uvicorn.Config(
                app,
                http="h11",
                ws="none",
                lifespan="off",
                log_config=None,
                timeout_graceful_shutdown=STOP_TIMEOUT_S,
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


def bind_admin(conn: Connection, config: AdminConfig, token: str) -> AdminServer:
    """Binds the admin listener (OSError if it cannot) and returns its server, not yet serving."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.create_server((config.host, config.port), family=family)
    return AdminServer(create_app(conn, token), sock)

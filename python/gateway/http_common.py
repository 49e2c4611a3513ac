"""What the admin and billing APIs share: OpenAI-shaped errors, the ledger dependency, tokens.

Every error leaves as `{"error": {"message", "type", "param", "code"}}`: an `ApiError` as it is,
the ledger's errors as 404 (`not_found`), 409 (`conflict`) or 400, a request FastAPI could not
validate as 400 naming the field in `param`, an unknown route or method as 404 or 405, and a
failing database as 503 (`database_unavailable`). Nothing here knows a route.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

import gateway
from gateway.config import describe_error
from gateway.ledger.db import (
    ConflictError,
    Connection,
    DatabaseError,
    LedgerError,
    NotFoundError,
)

__all__ = [
    "ApiError",
    "Ledger",
    "error_body",
    "new_app",
    "openapi_document",
    "router_openapi",
    "token_matches",
]

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as is: HTTP status, message, OpenAI `code` and `param`."""

    def __init__(
        self, status: int, message: str, code: str | None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


def error_body(
    status: int, message: str, code: str | None, param: str | None = None
) -> dict[str, dict[str, str | None]]:
    """The OpenAI error body of an answer with `status`."""
    kind = (
        "invalid_request_error"
        if status < 500
        else "service_unavailable"
        if status == 503
        else "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _response(error: ApiError) -> JSONResponse:
    body = error_body(error.status, str(error), error.code, error.param)
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(body, status_code=error.status, headers=headers)


def _validation_error(exc: RequestValidationError) -> ApiError:
    for item in exc.errors():
        if item["type"] == "json_invalid":
            reason = item.get("ctx", {}).get("error", "")
            return ApiError(400, f"the request body is not valid JSON: {reason}", None)
    problems = [describe_error(item) for item in exc.errors()]
    # A location starts with where the value came from (body, path, query): not a field.
    fields = [path.partition(".")[2] for path, _ in problems]
    message = "; ".join(
        f"{field or path}: {text}" for field, (path, text) in zip(fields, problems, strict=True)
    )
    return ApiError(400, message, None, (fields[0] or None) if fields else None)


def _as_api_error(exc: Exception) -> ApiError:
    """The answer to an exception a handler or FastAPI raised."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NotFoundError):
        return ApiError(404, str(exc), "not_found")
    if isinstance(exc, ConflictError):
        return ApiError(409, str(exc), "conflict")
    if isinstance(exc, LedgerError):
        return ApiError(400, str(exc), None)
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, HTTPException):
        code = {404: "unknown_route", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code)
    if isinstance(exc, DatabaseError):
        logger.error("HTTP API: database error: %s", exc)
        return ApiError(503, "the ledger database is unavailable; retry", "database_unavailable")
    raise TypeError(f"no answer for {exc!r}")


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    return _response(_as_api_error(exc))


def new_app(conn: Connection, title: str) -> FastAPI:
    """An app over `conn` (its `Ledger`) without FastAPI's public documentation routes, answering
    every error above with the OpenAI body; requests must run on the thread that owns `conn`."""
    app = FastAPI(
        title=title, version=gateway.__version__, openapi_url=None, docs_url=None, redoc_url=None
    )
    app.state.ledger = conn
    app.state.openapi_documents = {}
    for error in (ApiError, LedgerError, RequestValidationError, HTTPException, DatabaseError):
        app.add_exception_handler(error, _handle)
    return app


def token_matches(presented: str, expected: bytes | None) -> bool:
    """Whether `presented` is the token `expected`, compared in constant time; never when no
    token is configured (`expected` None or empty)."""
    if not expected:
        return False
    return hmac.compare_digest(presented.encode(), expected)


def router_openapi(router: APIRouter, title: str) -> dict[str, Any]:
    """The OpenAPI document of one router's routes: the admin and billing APIs share a listener
    but are documented, and authorised, apart."""
    return get_openapi(title=title, version=gateway.__version__, routes=router.routes)


def openapi_document(app: FastAPI, router: APIRouter, title: str) -> dict[str, Any]:
    """`router_openapi`, made once per app."""
    documents: dict[str, dict[str, Any]] = app.state.openapi_documents
    if title not in documents:
        documents[title] = router_openapi(router, title)
    return documents[title]


async def _ledger(request: Request) -> Connection:
    conn: Connection = request.app.state.ledger
    return conn


Ledger = Annotated[Connection, Depends(_ledger)]
"""A handler's parameter: the ledger connection of the app (`app.state.ledger`)."""

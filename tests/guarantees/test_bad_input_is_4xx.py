"""Guarantee 6: bad input gets a 4xx with an OpenAI-shaped error body (or the matching gRPC
status), never a 5xx, a crash or a hang; every listener bounds the time a client may take to send
headers and body, and every client-supplied string the gateway stores has a length limit; nothing
already metered is lost.

- `TestTheOpenAIApi`: bad bodies, credentials and client strings against a real `gateway serve`,
  which serves on afterwards.
- `TestAdminAndBillingBounds`: every number and string a client sends the admin and billing APIs
  is bounded; in process, over real ledgers on both backends.
- `TestSchemathesis`: generated cases, valid and invalid, against the admin and billing APIs of a
  real `gateway serve` on PostgreSQL.
- `TestSlowClients`, `TestSlowAdminClients`: the OpenAI and gRPC listeners, then the admin
  listener, cut a client that takes too long with its headers or its body.

gRPC's bad messages and their statuses are tested with the rest of the gRPC API
(`tests/e2e/test_grpc_api.py`).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import schemathesis
from fastapi import APIRouter
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ResponseReceived, TrailersReceived
from schemathesis import Case, Config, HookContext
from schemathesis.schemas import BaseSchema

from gateway import admin, billing_api
from gateway.bounds import MAX_COUNT as MAX_INTEGER
from gateway.bounds import MAX_MODEL_NAME, MAX_NAME, MAX_TIME_MS
from gateway.http_common import router_openapi
from tests.support import procs
from tests.support.billing_app import ADMIN, BILLING, Billing, Seeded
from tests.support.openai_errors import error
from tests.support.services.postgres import PostgresServer
from tests.support.slow_client import OUTER_S, TIMEOUTS, connection, until_closed
from tests.support.stack import Stack, StackFactory

# --- The OpenAI API -------------------------------------------------------------------------------

MODEL = "sim-model"

BAD_BODIES: list[bytes] = [
    b"",
    b"   ",
    b"null",
    b"42",
    b'"a string"',
    b"[]",
    b'[{"model": "sim-model"}]',
    b"{",
    b'{"model": "sim-model", "prompt": "x"',
    b'{"model": "sim-model", "prompt": "x"}}',
    b"\xff\xfe\x00garbage",
    b'{"model": "sim-\xff", "prompt": "x"}',
    b'{"model": "sim-model", "prompt": "x", "max_tokens": 1e400}',
    b'{"model": "sim-model", "prompt": "x", "max_tokens": 99999999999999999999999}',
    b'{"model": "sim-model", "prompt": "x", "max_tokens": 1.5}',
    b'{"model": "sim-model", "prompt": "x", "n": -1}',
    b'{"model": "sim-model", "prompt": "x", "n": 0}',
    b'{"model": "sim-model", "prompt": "x", "stream": "true"}',
    b'{"model": "sim-model", "prompt": "x", "stream": true, "stream_options": []}',
    b'{"model": {"name": "sim-model"}, "prompt": "x"}',
    b'{"model": null, "prompt": "x"}',
    b'{"model": "sim-model"}',
    b'{"model": "sim-model", "prompt": null}',
    b'{"model": "sim-model", "prompt": {"text": "x"}}',
    b'{"model": "sim-model", "prompt": [1, "two", [3]]}',
    b'{"model": "sim-model", "prompt": "x", "temperature": "hot"}',
    b'{"model": "sim-model", "prompt": "x", "max_tokens": 5000}',
    b'{"model": "sim-model", "prompt": "x", "stop": 7}',
    b'{"model": "sim-model", "prompt": "' + b"\\ud800" + b'"}',
    b'{"model": "sim-model", "prompt": "x", "stream": true,'
    b' "stream_options": {"include_usage": 3}}',
]

BAD_CHAT_BODIES: list[bytes] = [
    b'{"model": "sim-model"}',
    b'{"model": "sim-model", "messages": "hello"}',
    b'{"model": "sim-model", "messages": {"role": "user"}}',
    b'{"model": "sim-model", "messages": [1, 2]}',
    b'{"model": "sim-model", "messages": [{"content": "no role"}]}',
    b'{"model": "sim-model", "messages": [{"role": "user", "content": 5}]}',
    b'{"model": "sim-model", "messages": [], "max_completion_tokens": -3}',
]

BAD_EMBEDDING_BODIES: list[bytes] = [
    b'{"model": "sim-model"}',
    b'{"model": "sim-model", "input": null}',
    b'{"model": "sim-model", "input": []}',
    b'{"model": "sim-model", "input": [[]]}',
    b'{"model": "sim-model", "input": [1, "two"]}',
    b'{"model": "sim-model", "input": [[[1]]]}',
    b'{"model": "sim-model", "input": true}',
    b'{"model": "sim-model", "input": [18446744073709551616]}',
    b'{"model": "sim-model", "input": [-1]}',
    b'{"model": "sim-model", "input": [1e400]}',
    b'{"model": "sim-model", "input": "x", "input": "y"}',
    b'{"model": "sim-model", "input": "x", "dimensions": 18446744073709551616}',
    b'{"model": "sim-model", "input": "x", "dimensions": -1}',
    b'{"model": "sim-model", "input": "x", "encoding_format": "hex"}',
    b'{"model": "sim-model", "messages": "hello"}',
    b'{"model": "sim-model", "messages": [[]]}',
    b'{"model": "sim-model", "input": ' + b"[" * 200 + b"]" * 200 + b"}",
]


def _assert_openai_error(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert isinstance(body, dict)
    error = body["error"]
    assert isinstance(error, dict)
    assert isinstance(error.get("message"), str)
    assert error["message"]


def _post(stack: Stack, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/completions",
        content=body,
        headers={"authorization": f"Bearer {stack.key}"} | headers,
        timeout=30,
    )


@pytest.mark.e2e
class TestTheOpenAIApi:
    """Bad input to the OpenAI API of a real `gateway serve` in front of real `gateway sim`
    workers (the module's `stack`): a 4xx with an OpenAI-shaped body, never a 5xx, and nothing
    breaks."""

    @pytest.mark.parametrize("body", BAD_BODIES, ids=range(len(BAD_BODIES)))
    def test_bad_completion_bodies_are_4xx(self, stack: Stack, body: bytes) -> None:
        response = httpx.post(
            f"{stack.base_url}/completions",
            content=body,
            headers={"authorization": f"Bearer {stack.key}", "content-type": "application/json"},
        )
        _assert_openai_error(response)

    @pytest.mark.parametrize("body", BAD_CHAT_BODIES, ids=range(len(BAD_CHAT_BODIES)))
    def test_bad_chat_bodies_are_4xx(self, stack: Stack, body: bytes) -> None:
        response = httpx.post(
            f"{stack.base_url}/chat/completions",
            content=body,
            headers={"authorization": f"Bearer {stack.key}"},
        )
        _assert_openai_error(response)

    @pytest.mark.parametrize("body", BAD_EMBEDDING_BODIES, ids=range(len(BAD_EMBEDDING_BODIES)))
    def test_bad_embedding_bodies_are_4xx(self, stack: Stack, body: bytes) -> None:
        response = httpx.post(
            f"{stack.base_url}/embeddings",
            content=body,
            headers={"authorization": f"Bearer {stack.key}"},
        )
        _assert_openai_error(response)

    @pytest.mark.parametrize(
        "authorization",
        ["", "Bearer", "bearer tg-x", "Basic dXNlcjpwYXNz", "Bearer " + "x" * 10_000],
    )
    def test_bad_authorization_is_401(self, stack: Stack, authorization: str) -> None:
        response = httpx.post(
            f"{stack.base_url}/completions",
            json={"model": MODEL, "prompt": "x"},
            headers={"authorization": authorization},
        )
        assert response.status_code == 401
        _assert_openai_error(response)

    def test_non_ascii_authorization_is_401(self, stack: Stack) -> None:
        response = httpx.post(
            f"{stack.base_url}/completions",
            json={"model": MODEL, "prompt": "x"},
            headers=[(b"authorization", "Bearer tg-\u00e9\u00e8".encode("latin-1"))],
        )
        assert response.status_code == 401

    def test_gateway_still_serves_after_bad_input(self, stack: Stack) -> None:
        response = httpx.post(
            f"{stack.base_url}/completions",
            content=json.dumps({"model": MODEL, "prompt": "still here", "max_tokens": 2}),
            headers={"authorization": f"Bearer {stack.key}"},
        )
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] == 2

    def test_a_member_given_twice_under_any_spelling_is_named(self, stack: Stack) -> None:
        body = b'{"model": "sim-model", "prompt": "x", "max_tokens": 1, "max_tok\\u0065ns": 2}'
        details = error(_post(stack, body), 400)
        assert details["param"] == "max_tokens"
        assert "more than once" in details["message"]

    @pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "BeArEr"])
    def test_the_bearer_scheme_is_case_insensitive(self, stack: Stack, scheme: str) -> None:
        response = _post(
            stack,
            b'{"model": "sim-model", "prompt": "x", "max_tokens": 1}',
            authorization=f"{scheme} {stack.key}",
        )
        assert response.status_code == 200, response.text

    def test_client_strings_the_gateway_stores_are_bounded(self, stack: Stack) -> None:
        """A request id or a model name of 100 KB was served, stored whole and echoed."""
        ok = b'{"model": "sim-model", "prompt": "x", "max_tokens": 1}'
        for request_id in ("r" * 257, "r" * 100_000, "tab\tinside"):
            details = error(_post(stack, ok, **{"x-request-id": request_id}), 400)
            assert details["param"] == "x-request-id"
        long_model = json.dumps({"model": "m" * 10_000, "prompt": "x"}).encode()
        assert error(_post(stack, long_model), 400)["param"] == "model"
        fits = _post(stack, ok, **{"x-request-id": "r" * 256})
        assert fits.status_code == 200
        assert fits.headers["x-request-id"] == "r" * 256
        assert procs.wait_for(
            lambda: any(row["request_id"] == "r" * 256 for row in procs.usage_rows(stack.db))
        )
        assert max(len(str(row["request_id"])) for row in procs.usage_rows(stack.db)) <= 256

    def test_an_escaped_stream_options_is_replaced_not_doubled(self, stack: Stack) -> None:
        """The gateway asks the worker for usage by rewriting `stream_options`; a client that
        spells the key with escapes gets the same rewrite, not a second member (the simulator
        refuses a duplicate with 400; vLLM keeps the last one, the client's, and the worker's
        usage is lost)."""
        body = (
            b'{"model": "sim-model", "prompt": "count", "max_tokens": 4, "stream": true,'
            b' "stream_opti\\u006fns": {"include_usage": false}}'
        )
        headers = {"authorization": f"Bearer {stack.key}", "x-request-id": "escaped-options"}
        with httpx.stream(
            "POST", f"{stack.base_url}/completions", content=body, headers=headers, timeout=30
        ) as response:
            assert response.status_code == 200, response.read()
            events = list(procs.sse_events(response.iter_lines()))
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert all("usage" not in chunk for chunk in chunks), "the client did not ask for usage"
        assert procs.wait_for(
            lambda: any(
                row["request_id"] == "escaped-options" for row in procs.usage_rows(stack.db)
            )
        )
        row = next(
            row for row in procs.usage_rows(stack.db) if row["request_id"] == "escaped-options"
        )
        assert (row["usage_source"], row["completion_tokens"]) == ("worker", 4)


# --- The admin and billing APIs: bounds, in process -----------------------------------------------

TOO_BIG = (MAX_INTEGER + 1, 2**63 - 1, 2**63, 2**64, 10**30)
PRICE = {"prompt_per_mtok": 1, "cached_per_mtok": 1, "completion_per_mtok": 1}
QUOTA_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent",
    "token_budget",
    "money_budget_micros",
)


def send(api: Billing, method: str, path: str, body: object = None) -> Any:
    """A request with `body` as raw JSON (Python's own encoder: integers of any size, and
    strings as they are)."""
    if body is None:
        return api(path, ADMIN, method)
    return api(
        path,
        ADMIN,
        method,
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )


def models_priced(api: Billing) -> list[str]:
    return [price["model"] for price in send(api, "GET", "/admin/v1/prices").json()["data"]]


def refused(response: Any, param: str) -> str:
    details = error(response, 400)
    assert (details["type"], details["param"]) == ("invalid_request_error", param)
    message: str = details["message"]
    return message


class TestAdminAndBillingBounds:
    """Every number and string a client sends the admin and billing APIs is bounded: past its
    bound it is a 400 with the OpenAI error body naming it, never a 5xx (SQLite cannot bind an
    integer past 2^63, PostgreSQL refuses it and any NUL in text); at its bound it is taken. In
    process (ASGI), over real ledgers on both backends."""

    @pytest.mark.parametrize("value", TOO_BIG)
    def test_integers_past_the_bound_are_400_naming_the_field(
        self, api: Billing, seeded: Seeded, value: int
    ) -> None:
        for field in QUOTA_FIELDS:
            for path in (
                "/admin/v1/tenants/acme/quota",
                f"/admin/v1/keys/{seeded.acme_key_id}/quota",
            ):
                refused(send(api, "PUT", path, {field: value}), field)
        for field in PRICE:
            refused(send(api, "PUT", "/admin/v1/prices/m", PRICE | {field: value}), field)
        refused(
            send(api, "PUT", "/admin/v1/prices/m", PRICE | {"effective_at": value}), "effective_at"
        )
        # Nothing was stored.
        assert error(send(api, "GET", "/admin/v1/tenants/acme/quota"), 404)["code"] == (
            "quota_not_found"
        )
        assert models_priced(api) == ["sim-model"]

    def test_a_time_past_year_9999_is_400(self, api: Billing, seeded: Seeded) -> None:
        late = PRICE | {"effective_at": MAX_TIME_MS + 1}
        assert "253402300799999" in refused(
            send(api, "PUT", "/admin/v1/prices/m", late), "effective_at"
        )

    def test_integers_at_the_bound_are_taken(self, api: Billing, seeded: Seeded) -> None:
        policy = dict.fromkeys(QUOTA_FIELDS, MAX_INTEGER)
        stored = send(api, "PUT", "/admin/v1/tenants/acme/quota", policy)
        assert stored.status_code == 200, stored.text
        read = send(api, "GET", "/admin/v1/tenants/acme/quota").json()
        assert {field: read[field] for field in QUOTA_FIELDS} == policy
        price = dict.fromkeys(PRICE, MAX_INTEGER) | {"effective_at": MAX_TIME_MS}
        created = send(api, "PUT", "/admin/v1/prices/m", price)
        assert created.status_code == 201, created.text
        assert {k: created.json()[k] for k in price} == price

    @pytest.mark.parametrize(
        ("name", "problem"),
        [
            ("x" * (MAX_NAME + 1), f"at most {MAX_NAME} characters"),
            ("a\x00b", "control characters"),
            ("line\nbreak", "control characters"),
            ("\ud800", "unicode"),
            ("", "at least 1 character"),
        ],
    )
    def test_a_key_name_is_bounded(
        self, api: Billing, seeded: Seeded, name: str, problem: str
    ) -> None:
        response = send(api, "POST", "/admin/v1/tenants/acme/keys", {"name": name})
        assert problem in refused(response, "name")
        listed = send(api, "GET", "/admin/v1/tenants/acme/keys").json()["data"]
        assert [key["id"] for key in listed] == [seeded.acme_key_id]

    def test_a_key_name_at_the_bound_is_taken(self, api: Billing, seeded: Seeded) -> None:
        name = "ключ-" + "x" * (MAX_NAME - 5)
        issued = send(api, "POST", "/admin/v1/tenants/acme/keys", {"name": name})
        assert issued.status_code == 201, issued.text
        assert issued.json()["name"] == name

    def test_a_tenant_name_is_bounded(self, api: Billing) -> None:
        refused(send(api, "POST", "/admin/v1/tenants", {"name": "t" * 65}), "name")
        assert send(api, "POST", "/admin/v1/tenants", {"name": "t" * 64}).status_code == 201

    def test_a_price_model_name_is_bounded(self, api: Billing) -> None:
        for model, problem in (
            ("m" * (MAX_MODEL_NAME + 1), f"at most {MAX_MODEL_NAME} characters"),
            ("a%00b", "control characters"),
            ("a%09b", "control characters"),
        ):
            assert problem in refused(send(api, "PUT", f"/admin/v1/prices/{model}", PRICE), "model")
        assert models_priced(api) == []
        longest = "org/" + "m" * (MAX_MODEL_NAME - 4)
        assert send(api, "PUT", f"/admin/v1/prices/{longest}", PRICE).status_code == 201
        assert models_priced(api) == [longest]

    @pytest.mark.parametrize(
        ("method", "path", "param"),
        [
            ("GET", "/admin/v1/tenants/a%00b", "tenant"),
            ("PATCH", "/admin/v1/tenants/a%00b", "tenant"),
            ("GET", "/admin/v1/tenants/a%00b/keys", "tenant"),
            ("POST", "/admin/v1/tenants/a%00b/keys", "tenant"),
            ("GET", "/admin/v1/tenants/a%00b/quota", "tenant"),
            ("PUT", "/admin/v1/tenants/a%00b/quota", "tenant"),
            ("DELETE", "/admin/v1/tenants/a%00b/quota", "tenant"),
            ("DELETE", "/admin/v1/keys/a%00b", "key_id"),
            ("GET", "/admin/v1/keys/a%00b/quota", "key_id"),
            ("PUT", "/admin/v1/keys/a%00b/quota", "key_id"),
            ("DELETE", "/admin/v1/keys/a%00b/quota", "key_id"),
            ("GET", f"/admin/v1/tenants/{'t' * (MAX_NAME + 1)}", "tenant"),
            ("DELETE", f"/admin/v1/keys/{'k' * (MAX_NAME + 1)}", "key_id"),
        ],
    )
    def test_path_parameters_are_bounded(
        self, api: Billing, method: str, path: str, param: str
    ) -> None:
        body = (
            {"disabled": True} if method == "PATCH" else {} if method in ("PUT", "POST") else None
        )
        refused(send(api, method, path, body), param)

    @pytest.mark.parametrize(
        ("query", "param"),
        [
            ("usage-events?tenant=a%00b", "tenant"),
            (f"usage-events?tenant={'t' * (MAX_NAME + 1)}", "tenant"),
            ("usage-events?tenant=", "tenant"),
            (f"usage-events?after=evc1.{'A' * 600}", "after"),
            (f"usage-events?limit={2**64}", "limit"),
            ("usage?start_time=0&tenant=a%00b", "tenant"),
            (f"usage?start_time={2**63}", "start_time"),
            (f"usage?start_time=0&end_time={2**63}", "end_time"),
            (f"usage?start_time=0&limit={2**64}", "limit"),
            ("usage?start_time=0&limit=-1", "limit"),
            (f"usage?start_time=0&page=bkp1.{'A' * 600}", "page"),
            ("invoices?tenant=a%00b&period=2026-01", "tenant"),
            (f"invoices?tenant=acme&period={'2' * 100}", "period"),
            ("invoices?tenant=acme&period=2026-01%00", "period"),
        ],
    )
    def test_billing_query_parameters_are_bounded(
        self, api: Billing, seeded: Seeded, query: str, param: str
    ) -> None:
        for token in (BILLING, ADMIN):
            refused(api(f"/v1/billing/{query}", token), param)


# --- The admin and billing APIs: schemathesis -----------------------------------------------------

# Values that broke these APIs once, mixed into what is generated: integers past JSON's safe ones
# and past a BIGINT, a NUL (PostgreSQL's text refuses it), other control characters, a name past
# its length. Bound to every query and path parameter of their type and to every field of every
# request body (schemathesis keeps a path's control characters out of the URL itself).
HOSTILE = {
    "integer": [2**53, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63) - 1],
    "string": ["a\x00b", "\x00", "line\nbreak", "\x7f", "evt1.AAAA", "x" * 300],
}
DOCUMENTS = (
    (admin.router, admin.OPENAPI_TITLE, ADMIN),
    (billing_api.router, billing_api.OPENAPI_TITLE, BILLING),
)


def _body_fields(document: dict[str, Any]) -> dict[str, str]:
    """`body.NAME` of every field of the document's request bodies: the dictionary of its type."""
    components = document.get("components", {}).get("schemas", {})
    fields = {}
    for operation in (op for item in document["paths"].values() for op in item.values()):
        for media in operation.get("requestBody", {}).get("content", {}).values():
            # A body is a component, or (when optional) any of a component and null.
            for branch in media["schema"].get("anyOf", [media["schema"]]):
                ref = branch.get("$ref", "")
                component = components.get(ref.rpartition("/")[2], {})
                for name, field in component.get("properties", {}).items():
                    for kind in (option.get("type") for option in field.get("anyOf", [field])):
                        if kind in HOSTILE:
                            fields[f"body.{name}"] = f"hostile-{kind}"
    return fields


def config() -> Config:
    """Every phase but the stateful one (which only chains calls): the documents' examples, the
    coverage phase's boundary cases (each bound and one past it, every wrong type, missing and
    empty values), then fuzzing with valid and invalid cases; a path's tenant is often one that
    exists, so bodies get past the lookup to the ledger. No check of schemathesis' own: the
    test asserts what it wants of every response (`check`)."""
    bodies: dict[str, str] = {}
    for router, title, _ in DOCUMENTS:
        bodies |= _body_fields(router_openapi(router, title))
    return Config.from_dict(
        {
            "seed": 20260112,
            "suppress-health-check": ["all"],
            "generation": {
                "mode": "all",
                "max-examples": 80,
                "deterministic": True,
                "database": "none",
                "with-security-parameters": False,
                "dictionaries": {
                    kind: {"dictionary": f"hostile-{kind}", "probability": 0.25} for kind in HOSTILE
                },
            },
            "dictionaries": {f"hostile-{kind}": {"values": v} for kind, v in HOSTILE.items()}
            | {"tenants": {"values": ["acme"]}},
            "parameters": {"path.tenant": {"dictionary": "tenants", "probability": 0.5}}
            | {key: {"dictionary": name, "probability": 0.25} for key, name in bodies.items()},
            "checks": {"enabled": False},
            "phases": {"stateful": {"enabled": False}},
        }
    )


def _integers(value: Any) -> Any:
    """`value` with integral floats as integers, in its lists and objects too."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integers(item) for item in value]
    if isinstance(value, dict):
        return {key: _integers(item) for key, item in value.items()}
    return value


def schema(router: APIRouter, title: str, token: str) -> BaseSchema:
    loaded = schemathesis.openapi.from_dict(router_openapi(router, title), config=config())
    loaded.config.update(headers={"Authorization": f"Bearer {token}"})

    # JSON Schema counts 3.0 as an integer and so does schemathesis, but the APIs' models are
    # strict: a case with one would be refused before it reached anything else to test.
    @loaded.hook
    def map_body(context: HookContext, body: Any) -> Any:
        return _integers(body)

    return loaded


admin_schema = schema(admin.router, admin.OPENAPI_TITLE, ADMIN)
billing_schema = schema(billing_api.router, billing_api.OPENAPI_TITLE, BILLING)


@dataclass
class Listener:
    gateway: procs.Process
    url: str


def check(case: Case[Any], listener: Listener) -> None:
    response = case.call(base_url=listener.url, timeout=10)
    where = f"{case.as_curl_command()}\n-> {response.status_code} {response.text[:500]}"
    assert response.status_code < 500, where
    if response.status_code >= 400:
        body: Any = json.loads(response.content)
        assert isinstance(body, dict), where
        assert list(body) == ["error"], where
        assert set(body["error"]) == {"message", "type", "param", "code"}, where
        assert isinstance(body["error"]["message"], str), where
        assert body["error"]["message"], where


@pytest.mark.e2e
# Only when a case fails: Hypothesis then warns that its report of the case is long, which would
# hide the failure itself.
@pytest.mark.filterwarnings(
    "ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning"
)
class TestSchemathesis:
    """Schemathesis against the admin and billing APIs of a real `gateway serve`: from each API's
    OpenAPI document it sends cases that fit the schema and cases that break it (wrong types,
    values past their bounds, missing and extra fields, odd strings, NULs), with the API's bearer
    token, and every answer must be below 500, a 4xx with the OpenAI error body. Seeded and
    deterministic, a fixed number of cases per operation. The ledger is PostgreSQL, which refuses
    more than SQLite (integers past a BIGINT, a NUL in text).

    The cases are generated from the documents the code makes (`router_openapi`): schemathesis'
    pytest integration wants its schema when tests are collected, before any fixture can start a
    gateway (its fixture-loaded form, `schemathesis.pytest.from_fixture`, sets a node attribute
    that pytest 9 no longer has). The listener is checked to serve exactly those documents,
    behind the same tokens, and the cases are sent to it."""

    @pytest.fixture(scope="class")
    @classmethod
    def listener(
        cls, tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer
    ) -> Iterator[Listener]:
        tmp = tmp_path_factory.mktemp("schemathesis")
        sim = procs.start_sim()
        try:
            with postgres.database() as ledger:
                procs.create_key(ledger, "acme")
                extra = "[admin]\nport = 0\n"
                config = procs.write_config(tmp / "gateway.toml", [sim.url], ledger, extra)
                env = {"TOKENGATE_ADMIN_TOKEN": ADMIN, "TOKENGATE_BILLING_TOKEN": BILLING}
                gateway = procs.start(["serve", "--config", str(config)], env=env)
                try:
                    url = procs.wait_line(gateway, r"admin API listening on (http://\S+)").group(1)
                    yield Listener(gateway, url)
                finally:
                    gateway.stop()
        finally:
            sim.stop()

    def test_the_listener_serves_these_documents(self, listener: Listener) -> None:
        for path, token, expected in (
            ("/admin/v1/openapi.json", ADMIN, admin_schema),
            ("/v1/billing/openapi.json", BILLING, billing_schema),
        ):
            served = httpx.get(
                f"{listener.url}{path}", headers={"authorization": f"Bearer {token}"}, timeout=10
            )
            assert served.status_code == 200, served.text
            assert served.json() == expected.raw_schema
            assert httpx.get(f"{listener.url}{path}", timeout=10).status_code == 401

    @admin_schema.parametrize()
    def test_the_admin_api_answers_every_case_below_500(
        self, case: Case[Any], listener: Listener
    ) -> None:
        check(case, listener)

    @billing_schema.parametrize()
    def test_the_billing_api_answers_every_case_below_500(
        self, case: Case[Any], listener: Listener
    ) -> None:
        check(case, listener)

    def test_the_gateway_logged_no_error(self, listener: Listener) -> None:
        """Run last (pytest keeps a class's order): what the cases above stored (policies, prices,
        keys) reached the core's snapshots without an error."""
        error = procs.logged_error("".join(listener.gateway.output))
        assert error is None, error


# --- Slow clients: the OpenAI and gRPC listeners --------------------------------------------------

GRPC = "[grpc]\nport = 0\n"


@pytest.mark.e2e
class TestSlowClients:
    """Every listener of `gateway serve`, the OpenAI API's and the gRPC API's, bounds the time a
    client may take: headers, a body; and a stream whose worker falls silent is cut. Each test
    holds a connection the way a hostile client would and waits for the gateway to cut it,
    within a generous outer bound; none waits on a fixed time."""

    @pytest.fixture
    def stack(self, make_stack: StackFactory) -> Stack:
        return make_stack(
            n_sims=2, server=TIMEOUTS, routing="stream_idle_timeout_ms = 1000\n", itl_ms=5
        )

    def test_headers_trickled_a_byte_at_a_time_are_cut(self, stack: Stack) -> None:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nX-Trickle: " + b"a" * 200
        with connection(stack.gateway.url) as sock:
            _, after = until_closed(sock, head)
        assert after < OUTER_S

    def test_an_idle_connection_is_closed(self, stack: Stack) -> None:
        with connection(stack.gateway.url) as sock:
            received, _ = until_closed(sock)
        assert received == b"" or received.startswith(b"HTTP/1.1 408"), received

    def test_a_body_that_never_arrives_is_408_and_closed(self, stack: Stack) -> None:
        head = (
            "POST /v1/completions HTTP/1.1\r\nHost: gateway\r\n"
            f"Authorization: Bearer {stack.key}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n{"
        ).encode()
        with connection(stack.gateway.url) as sock:
            sock.sendall(head)
            received, _ = until_closed(sock)
        status, _, rest = received.partition(b"\r\n")
        assert status == b"HTTP/1.1 408 Request Timeout", received
        body = rest.partition(b"\r\n\r\n")[2]
        details = json.loads(body)["error"]
        assert details["code"] == "request_timeout"
        assert set(details) == {"message", "type", "param", "code"}

    def test_a_worker_that_falls_silent_mid_stream_is_cut_billed_and_taken_out(
        self, stack: Stack
    ) -> None:
        body = {"model": MODEL, "prompt": "count", "max_tokens": 60, "stream": True}
        headers = {"authorization": f"Bearer {stack.key}", "x-request-id": "frozen-worker"}
        paused: list[procs.Process] = []
        events: list[str] = []
        try:
            with (
                httpx.Client(timeout=OUTER_S) as client,
                client.stream(
                    "POST", f"{stack.base_url}/completions", json=body, headers=headers
                ) as response,
            ):
                assert response.status_code == 200
                for event in procs.sse_events(response.iter_lines()):
                    events.append(event)
                    if len(events) == 3:
                        # Freeze whichever worker serves this stream.
                        for sim in stack.sims:
                            if procs.scrape(sim.url).get("vllm:num_requests_running"):
                                os.kill(sim.proc.pid, signal.SIGSTOP)
                                paused.append(sim)
                        assert len(paused) == 1
            assert events[-1] == "[DONE]"
            failure = json.loads(events[-2])["error"]
            assert failure["code"] == "upstream_failed"
            health = f"{stack.gateway.url}/health"
            assert procs.wait_for(lambda: httpx.get(health).json()["healthy_workers"] == 1)

            def row() -> dict[str, object] | None:
                rows = procs.usage_rows(stack.db)
                return next((r for r in rows if r["request_id"] == "frozen-worker"), None)

            assert procs.wait_for(lambda: row() is not None)
            billed = row()
            assert billed is not None
            assert billed["status"] == "failed"
            # Billed for what was relayed before the worker froze: at least the three events read.
            completion = billed["completion_tokens"]
            assert isinstance(completion, int)
            assert 3 <= completion < 60, billed
            # The other worker serves the next request.
            served = httpx.post(
                f"{stack.base_url}/completions",
                json={"model": MODEL, "prompt": "again", "max_tokens": 2},
                headers={"authorization": f"Bearer {stack.key}"},
                timeout=OUTER_S,
            )
            assert served.status_code == 200
        finally:
            for sim in paused:
                os.kill(sim.proc.pid, signal.SIGCONT)

    @pytest.fixture
    def grpc_stack(self, make_stack: StackFactory) -> tuple[Stack, str]:
        stack = make_stack(n_sims=1, config_extra=GRPC, server=TIMEOUTS, itl_ms=1)
        target = procs.wait_line(stack.gateway, r"gRPC API listening on (\S+)")[1]
        return stack, f"http://{target}"

    def test_a_grpc_connection_without_a_call_is_closed(
        self, grpc_stack: tuple[Stack, str]
    ) -> None:
        _, url = grpc_stack
        with connection(url) as sock:
            until_closed(sock)
        # The HTTP/2 preface, a byte at a time, never becomes a call.
        with connection(url) as sock:
            until_closed(sock, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" * 4)

    def test_a_grpc_request_message_that_never_arrives_is_deadline_exceeded(
        self,
        grpc_stack: tuple[Stack, str],
    ) -> None:
        stack, url = grpc_stack
        h2 = H2Connection(H2Configuration(client_side=True))
        h2.initiate_connection()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/gateway.v1.InferenceService/Completion"),
            (":authority", "gateway"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("authorization", f"Bearer {stack.key}"),
        ]
        h2.send_headers(1, headers)
        # A message that says it has 100 bytes, and sends one.
        h2.send_data(1, b"\x00\x00\x00\x00\x64\x0a")
        status: bytes | None = None
        with connection(url) as sock:
            sock.sendall(h2.data_to_send())
            sock.settimeout(OUTER_S)
            while status is None:
                data = sock.recv(65536)
                assert data, "the connection closed before the call was answered"
                for event in h2.receive_data(data):
                    if isinstance(event, ResponseReceived | TrailersReceived):
                        status = dict(event.headers).get(b"grpc-status", status)
                sock.sendall(h2.data_to_send())
        assert status == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0]).encode()


# --- Slow clients: the admin listener -------------------------------------------------------------

AUTH = f"Authorization: Bearer {ADMIN}\r\n"


@dataclass
class Admin:
    gateway: procs.Process
    url: str


def timed_out(received: bytes) -> None:
    """`received` is one 408 with the OpenAI error body, `request_timeout`, closing."""
    head, _, body = received.partition(b"\r\n\r\n")
    status, *headers = head.split(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout", received
    assert b"connection: close" in [h.lower() for h in headers], received
    details = json.loads(body)["error"]
    assert set(details) == {"message", "type", "param", "code"}
    assert (details["code"], details["type"]) == ("request_timeout", "invalid_request_error")


@pytest.mark.e2e
class TestSlowAdminClients:
    """The admin listener (the admin and billing APIs) bounds the time a client may take:
    `server.header_read_timeout_ms` for a request's headers, an idle connection's next request
    included, and `server.body_read_timeout_ms` for its body, then 408 `request_timeout`; what is
    not HTTP at all is 400, with the OpenAI error body too. A real `gateway serve` with bounds of
    half a second; each test holds a connection as a hostile client would and waits for the
    gateway to cut it, within a generous outer bound (`until_closed`)."""

    @pytest.fixture(scope="class")
    @classmethod
    def admin(cls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Admin]:
        tmp = tmp_path_factory.mktemp("admin-slow-clients")
        sim = procs.start_sim()
        config = procs.write_config(
            tmp / "gateway.toml",
            [sim.url],
            tmp / "ledger.db",
            "[admin]\nport = 0\n",
            server=TIMEOUTS,
        )
        gateway = procs.start(
            ["serve", "--config", str(config)], env={"TOKENGATE_ADMIN_TOKEN": ADMIN}
        )
        try:
            url = procs.wait_line(gateway, r"admin API listening on (http://\S+)").group(1)
            yield Admin(gateway, url)
        finally:
            gateway.stop()
            sim.stop()

    def test_headers_trickled_a_byte_at_a_time_are_cut(self, admin: Admin) -> None:
        # At a byte every 0.1 s, these headers would take longer than `OUTER_S` to arrive.
        for path in ("/admin/v1/tenants", "/v1/billing/usage-events"):
            head = f"GET {path} HTTP/1.1\r\nHost: admin\r\n{AUTH}X-Trickle: ".encode() + b"a" * 200
            with connection(admin.url) as sock:
                received, _ = until_closed(sock, head)
            assert received == b""

    def test_a_connection_that_sends_nothing_is_closed(self, admin: Admin) -> None:
        with connection(admin.url) as sock:
            received, _ = until_closed(sock)
        assert received == b""

    def test_a_kept_alive_connections_next_request_has_the_header_bound(self, admin: Admin) -> None:
        request = f"GET /admin/v1/tenants HTTP/1.1\r\nHost: admin\r\n{AUTH}\r\n".encode()
        with connection(admin.url) as sock:
            sock.sendall(request)
            # The next request's headers trickle in after the first answer.
            received, _ = until_closed(
                sock, request.removesuffix(b"\r\n") + b"X-Trickle: " + b"a" * 200
            )
        assert received.startswith(b"HTTP/1.1 200 OK\r\n"), received
        assert received.count(b"HTTP/1.1") == 1, received

    def test_a_body_that_never_arrives_is_408_and_closed(self, admin: Admin) -> None:
        head = (
            f"POST /admin/v1/tenants HTTP/1.1\r\nHost: admin\r\n{AUTH}"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        ).encode()
        with connection(admin.url) as sock:
            sock.sendall(head)
            received, _ = until_closed(sock)
        timed_out(received)

    def test_a_body_trickled_a_byte_at_a_time_is_408_and_closed(self, admin: Admin) -> None:
        body = json.dumps({"name": "x" * 100}).encode()
        head = (
            f"POST /admin/v1/tenants HTTP/1.1\r\nHost: admin\r\n{AUTH}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with connection(admin.url) as sock:
            sock.sendall(head)
            received, _ = until_closed(sock, body)
        timed_out(received)
        tenants = httpx.get(
            f"{admin.url}/admin/v1/tenants",
            headers={"authorization": f"Bearer {ADMIN}"},
            timeout=10,
        )
        assert tenants.json()["data"] == []

    @pytest.mark.parametrize(
        "request_head",
        [
            b"GARBAGE\r\n\r\n",
            b"GET /admin/v1/tenants HTTP/1.1\r\nHost: admin\r\nNo colon here\r\n\r\n",
            b"GET /admin/v1/tenants HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        ],
        ids=["request-line", "header-line", "two-lengths"],
    )
    def test_a_request_that_is_not_http_is_400_with_the_openai_body(
        self, admin: Admin, request_head: bytes
    ) -> None:
        with connection(admin.url) as sock:
            sock.sendall(request_head)
            received, _ = until_closed(sock)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), received
        details = json.loads(body)["error"]
        assert set(details) == {"message", "type", "param", "code"}
        assert details["type"] == "invalid_request_error"

    def test_clients_within_the_bounds_are_served_on_one_connection(self, admin: Admin) -> None:
        headers = {"authorization": f"Bearer {ADMIN}"}
        with httpx.Client(base_url=admin.url, headers=headers, timeout=OUTER_S) as client:
            created = client.post("/admin/v1/tenants", json={"name": "patient"})
            assert created.status_code == 201, created.text
            listed = client.get("/admin/v1/tenants")
            assert [t["name"] for t in listed.json()["data"]] == ["patient"]
            assert client.get("/v1/billing/usage-events").status_code == 200

    def test_the_gateway_logged_no_error(self, admin: Admin) -> None:
        """Run last: the application, cut off from a body, answered nobody and raised nothing."""
        error = procs.logged_error("".join(admin.gateway.output))
        assert error is None, error

"""Schemathesis against the admin and billing APIs of a real `gateway serve` (guarantee 6): from
each API's OpenAPI document it sends cases that fit the schema and cases that break it (wrong
types, values past their bounds, missing and extra fields, odd strings, NULs), with the API's
bearer token, and every answer must be below 500, a 4xx with the OpenAI error body. Seeded and
deterministic, a fixed number of cases per operation. The ledger is PostgreSQL, which refuses
more than SQLite (integers past a BIGINT, a NUL in text).

The cases are generated from the documents the code makes (`router_openapi`): schemathesis'
pytest integration wants its schema when tests are collected, before any fixture can start a
gateway (its fixture-loaded form, `schemathesis.pytest.from_fixture`, sets a node attribute that
pytest 9 no longer has). The listener is checked to serve exactly those documents, behind the
same tokens, and the cases are sent to it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import APIRouter
from schemathesis import Case, Config, HookContext
from schemathesis.schemas import BaseSchema

from gateway import admin, billing_api
from gateway.http_common import router_openapi
from tests.support import procs
from tests.support.services.postgres import PostgresServer

pytestmark = [
    pytest.mark.e2e,
    # Only when a case fails: Hypothesis then warns that its report of the case is long, which
    # would hide the failure itself.
    pytest.mark.filterwarnings(
        "ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning"
    ),
]

ADMIN = "schemathesis-admin-token"
BILLING = "schemathesis-billing-token"

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


@pytest.fixture(scope="module")
def listener(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer
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


def test_the_listener_serves_these_documents(listener: Listener) -> None:
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
def test_the_admin_api_answers_every_case_below_500(case: Case[Any], listener: Listener) -> None:
    check(case, listener)


@billing_schema.parametrize()
def test_the_billing_api_answers_every_case_below_500(case: Case[Any], listener: Listener) -> None:
    check(case, listener)


def test_the_gateway_logged_no_error(listener: Listener) -> None:
    """Run last (pytest keeps a module's order): what the cases above stored (policies, prices,
    keys) reached the core's snapshots without an error."""
    logged = "".join(listener.gateway.output)
    assert not re.search(r"Traceback|ERROR|Exception", logged), logged[-3000:]

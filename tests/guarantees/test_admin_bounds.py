"""Every number and string a client sends the admin and billing APIs is bounded (guarantee 6):
past its bound it is a 400 with the OpenAI error body naming it, never a 5xx (SQLite cannot bind
an integer past 2^63, PostgreSQL refuses it and any NUL in text); at its bound it is taken.
In process (ASGI), over real ledgers on both backends."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.bounds import MAX_COUNT as MAX_INTEGER
from gateway.bounds import MAX_MODEL_NAME, MAX_NAME, MAX_TIME_MS
from tests.support.billing_app import ADMIN, BILLING, Billing, Seeded
from tests.support.openai_errors import error

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


@pytest.mark.parametrize("value", TOO_BIG)
def test_integers_past_the_bound_are_400_naming_the_field(
    api: Billing, seeded: Seeded, value: int
) -> None:
    for field in QUOTA_FIELDS:
        for path in ("/admin/v1/tenants/acme/quota", f"/admin/v1/keys/{seeded.acme_key_id}/quota"):
            refused(send(api, "PUT", path, {field: value}), field)
    for field in PRICE:
        refused(send(api, "PUT", "/admin/v1/prices/m", PRICE | {field: value}), field)
    refused(send(api, "PUT", "/admin/v1/prices/m", PRICE | {"effective_at": value}), "effective_at")
    # Nothing was stored.
    assert error(send(api, "GET", "/admin/v1/tenants/acme/quota"), 404)["code"] == (
        "quota_not_found"
    )
    assert models_priced(api) == ["sim-model"]


def test_a_time_past_year_9999_is_400(api: Billing, seeded: Seeded) -> None:
    late = PRICE | {"effective_at": MAX_TIME_MS + 1}
    assert "253402300799999" in refused(
        send(api, "PUT", "/admin/v1/prices/m", late), "effective_at"
    )


def test_integers_at_the_bound_are_taken(api: Billing, seeded: Seeded) -> None:
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
def test_a_key_name_is_bounded(api: Billing, seeded: Seeded, name: str, problem: str) -> None:
    response = send(api, "POST", "/admin/v1/tenants/acme/keys", {"name": name})
    assert problem in refused(response, "name")
    listed = send(api, "GET", "/admin/v1/tenants/acme/keys").json()["data"]
    assert [key["id"] for key in listed] == [seeded.acme_key_id]


def test_a_key_name_at_the_bound_is_taken(api: Billing, seeded: Seeded) -> None:
    name = "ключ-" + "x" * (MAX_NAME - 5)
    issued = send(api, "POST", "/admin/v1/tenants/acme/keys", {"name": name})
    assert issued.status_code == 201, issued.text
    assert issued.json()["name"] == name


def test_a_tenant_name_is_bounded(api: Billing) -> None:
    refused(send(api, "POST", "/admin/v1/tenants", {"name": "t" * 65}), "name")
    assert send(api, "POST", "/admin/v1/tenants", {"name": "t" * 64}).status_code == 201


def test_a_price_model_name_is_bounded(api: Billing) -> None:
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
def test_path_parameters_are_bounded(api: Billing, method: str, path: str, param: str) -> None:
    body = {"disabled": True} if method == "PATCH" else {} if method in ("PUT", "POST") else None
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
    api: Billing, seeded: Seeded, query: str, param: str
) -> None:
    for token in (BILLING, ADMIN):
        refused(api(f"/v1/billing/{query}", token), param)

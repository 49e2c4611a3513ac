"""The admin API in-process (ASGI, no socket) over a real SQLite ledger: auth, routes, errors."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from gateway.admin import create_app
from gateway.keys import hash_key
from gateway.ledger.apikeys import active_key_snapshot
from gateway.ledger.db import Connection, query
from gateway.ledger.quotas import policy_snapshot
from gateway.quotas import QuotaPolicy
from tests.support.openai_errors import error

TOKEN = "admin-secret-token"


class Admin:
    """Sends requests to an app over `conn`, on this thread (the one that owns `conn`)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.app = create_app(conn, TOKEN)

    def __call__(
        self, method: str, path: str, token: str | None = TOKEN, **kwargs: Any
    ) -> httpx.Response:
        # Latin-1, as HTTP carries header bytes: a non-ASCII token must be refused, not crash.
        headers: dict[bytes, bytes] = {}
        if token is not None:
            headers[b"authorization"] = f"Bearer {token}".encode("latin-1")
        headers |= kwargs.pop("headers", {})

        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
                return await client.request(method, f"/admin/v1{path}", headers=headers, **kwargs)

        return asyncio.run(send())


@pytest.fixture
def admin(ledger: Connection) -> Admin:
    return Admin(ledger)


def routes(admin: Admin) -> list[tuple[str, str]]:
    """(method, path) of every documented route, with sample path parameters."""
    schema = admin("GET", "/openapi.json").json()
    found = []
    for path, operations in schema["paths"].items():
        concrete = path.removeprefix("/admin/v1")
        concrete = concrete.replace("{tenant}", "acme").replace("{key_id}", "key_000000000000")
        concrete = concrete.replace("{model}", "m")
        found += [(method.upper(), concrete) for method in operations]
    return found


def test_openapi_documents_every_route_behind_the_bearer_token(admin: Admin) -> None:
    schema = admin("GET", "/openapi.json").json()
    assert schema["info"]["title"] == "tokengate admin API"
    assert {path: sorted(ops) for path, ops in schema["paths"].items()} == {
        "/admin/v1/tenants": ["get", "post"],
        "/admin/v1/tenants/{tenant}": ["get", "patch"],
        "/admin/v1/tenants/{tenant}/keys": ["get", "post"],
        "/admin/v1/keys/{key_id}": ["delete"],
        "/admin/v1/tenants/{tenant}/quota": ["delete", "get", "put"],
        "/admin/v1/keys/{key_id}/quota": ["delete", "get", "put"],
        "/admin/v1/prices/{model}": ["put"],
        "/admin/v1/prices": ["get"],
        "/admin/v1/reload": ["post"],
        "/admin/v1/fleet": ["get"],
        "/admin/v1/changes": ["get"],
    }
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for operations in schema["paths"].values():
        for operation in operations.values():
            assert operation["security"] == [{"HTTPBearer": []}]
    policy = schema["components"]["schemas"]["QuotaPolicy"]
    assert set(policy["properties"]) == set(QuotaPolicy.model_fields)


def test_every_route_refuses_a_missing_or_wrong_token(admin: Admin) -> None:
    for method, path in [("GET", "/openapi.json"), *routes(admin)]:
        for token, code in (
            (None, "missing_admin_token"),
            ("wrong", "invalid_admin_token"),
            (TOKEN + "x", "invalid_admin_token"),
            ("tøken", "invalid_admin_token"),
        ):
            response = admin(method, path, token=token, json={"name": "acme"})
            assert error(response, 401)["code"] == code, (method, path, token)
            assert response.headers["www-authenticate"] == "Bearer"
        basic = admin(
            method, path, token=None, headers={b"authorization": b"Basic " + TOKEN.encode()}
        )
        assert error(basic, 401)["code"] == "missing_admin_token"
    assert query(admin.conn, "SELECT COUNT(*) FROM tenants") == [(0,)]


def test_tenants_and_keys(admin: Admin) -> None:
    created = admin("POST", "/tenants", json={"name": "acme"})
    assert created.status_code == 201
    tenant = created.json()
    assert set(tenant) == {"id", "name", "created_at", "disabled"}
    assert (tenant["name"], tenant["disabled"]) == ("acme", False)
    assert admin("GET", f"/tenants/{tenant['id']}").json() == tenant
    assert admin("GET", "/tenants").json() == {"data": [tenant]}

    issued = admin("POST", "/tenants/acme/keys", json={"name": "ci"})
    assert issued.status_code == 201
    key = issued.json()
    assert key["key"].startswith("tg-")
    assert (key["tenant_id"], key["name"], key["revoked_at"]) == (tenant["id"], "ci", None)
    assert admin("POST", "/tenants/acme/keys").status_code == 201  # the body is optional
    listed = admin("GET", "/tenants/acme/keys").json()["data"]
    assert len(listed) == 2
    assert all("key" not in k for k in listed)
    hashes = [e["hash"] for e in active_key_snapshot(admin.conn)["keys"]]
    assert hash_key(key["key"]) in hashes

    revoked = admin("DELETE", f"/keys/{key['id']}")
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    assert admin("DELETE", f"/keys/{key['id']}").json() == revoked.json()
    assert hash_key(key["key"]) not in [e["hash"] for e in active_key_snapshot(admin.conn)["keys"]]

    disabled = admin("PATCH", "/tenants/acme", json={"disabled": True})
    assert disabled.json()["disabled"] is True
    assert active_key_snapshot(admin.conn) == {"keys": []}
    assert admin("PATCH", "/tenants/acme", json={"disabled": False}).json()["disabled"] is False


def test_ledger_errors_are_404_409_and_400(admin: Admin) -> None:
    admin("POST", "/tenants", json={"name": "acme"})
    assert error(admin("POST", "/tenants", json={"name": "acme"}), 409)["code"] == "conflict"
    assert (
        "invalid tenant name"
        in error(admin("POST", "/tenants", json={"name": "a b"}), 400)["message"]
    )
    for method, path in (
        ("GET", "/tenants/nobody"),
        ("PATCH", "/tenants/nobody"),
        ("POST", "/tenants/nobody/keys"),
        ("GET", "/tenants/nobody/keys"),
        ("DELETE", "/keys/key_000000000000"),
        ("PUT", "/tenants/nobody/quota"),
        ("GET", "/keys/key_000000000000/quota"),
        ("DELETE", "/keys/key_000000000000/quota"),
    ):
        body = {"disabled": True} if method == "PATCH" else {}
        assert error(admin(method, path, json=body), 404)["code"] == "not_found", path


def test_tenant_and_key_quotas(admin: Admin) -> None:
    tenant = admin("POST", "/tenants", json={"name": "acme"}).json()
    key = admin("POST", "/tenants/acme/keys").json()
    assert error(admin("GET", "/tenants/acme/quota"), 404)["code"] == "quota_not_found"

    policy = {"requests_per_minute": 60, "money_budget_micros": 5_000_000, "models": ["b", "a"]}
    put = admin("PUT", "/tenants/acme/quota", json=policy)
    assert put.status_code == 200
    expected = QuotaPolicy.model_validate(policy).model_dump()
    assert put.json() == expected
    assert expected["models"] == ["a", "b"]
    assert admin("GET", f"/tenants/{tenant['id']}/quota").json() == expected

    assert admin("PUT", f"/keys/{key['id']}/quota", json={"max_concurrent": 1}).is_success
    assert admin("GET", f"/keys/{key['id']}/quota").json()["max_concurrent"] == 1
    snapshot = policy_snapshot(admin.conn, 0)
    assert snapshot["tenants"][tenant["id"]]["requests_per_minute"] == 60
    assert snapshot["keys"][key["id"]]["max_concurrent"] == 1

    # PUT replaces the whole policy.
    admin("PUT", "/tenants/acme/quota", json={"token_budget": 10})
    assert admin("GET", "/tenants/acme/quota").json() == QuotaPolicy(token_budget=10).model_dump()

    for path in ("/tenants/acme/quota", f"/keys/{key['id']}/quota"):
        deleted = admin("DELETE", path)
        assert (deleted.status_code, deleted.content) == (204, b"")
        assert admin("DELETE", path).status_code == 204
        assert error(admin("GET", path), 404)["code"] == "quota_not_found"
    assert policy_snapshot(admin.conn, 0) == {"tenants": {}, "keys": {}, "prices": {}}


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"requests_per_minute": 0}, "requests_per_minute", "greater than or equal to 1"),
        ({"token_budget": "100"}, "token_budget", "valid integer"),
        ({"budget_period": "week"}, "budget_period", "'day' or 'month'"),
        ({"models": []}, "models", "at least 1 item"),
        ({"models": ["a", ""]}, "models", "non-empty"),
        ({"rpm": 5}, "rpm", "Extra inputs are not permitted"),
        ([1, 2], None, "valid dictionary"),
    ],
)
def test_bad_quota_bodies_are_400_naming_the_field(
    admin: Admin, body: object, param: str | None, message: str
) -> None:
    admin("POST", "/tenants", json={"name": "acme"})
    details = error(admin("PUT", "/tenants/acme/quota", json=body), 400)
    assert (details["type"], details["param"], details["code"]) == (
        "invalid_request_error",
        param,
        None,
    )
    assert message in details["message"]
    assert admin("GET", "/tenants/acme/quota").status_code == 404


def test_malformed_and_missing_bodies_are_400(admin: Admin) -> None:
    admin("POST", "/tenants", json={"name": "acme"})
    headers = {b"content-type": b"application/json"}
    malformed = admin("PUT", "/tenants/acme/quota", content=b"{nope", headers=headers)
    assert "JSON" in error(malformed, 400)["message"]
    assert "Field required" in error(admin("POST", "/tenants"), 400)["message"]
    assert error(admin("PATCH", "/tenants/acme", json={"disabled": "yes"}), 400)["param"] == (
        "disabled"
    )


def test_prices(admin: Admin) -> None:
    body = {"prompt_per_mtok": 150_000, "cached_per_mtok": 75_000, "completion_per_mtok": 600_000}
    put = admin("PUT", "/prices/org/model-7b", json=body | {"effective_at": 1000})
    assert put.status_code == 201
    assert put.json()["model"] == "org/model-7b"
    assert put.json()["effective_at"] == 1000
    assert error(admin("PUT", "/prices/org/model-7b", json=body | {"effective_at": 1000}), 409)[
        "code"
    ] == ("conflict")
    assert admin("PUT", "/prices/org/model-7b", json=body).status_code == 201  # from now
    listed = admin("GET", "/prices").json()["data"]
    assert [(p["model"], p["prompt_per_mtok"]) for p in listed] == [("org/model-7b", 150_000)] * 2
    assert policy_snapshot(admin.conn, listed[1]["effective_at"])["prices"] == {
        "org/model-7b": {"prompt": 150_000, "cached": 75_000, "completion": 600_000}
    }
    negative = admin("PUT", "/prices/m", json=body | {"cached_per_mtok": -1})
    assert error(negative, 400)["param"] == "cached_per_mtok"
    assert error(admin("PUT", "/prices/m", json={"prompt_per_mtok": 1}), 400)["param"] in (
        "cached_per_mtok",
        "completion_per_mtok",
    )


def test_unknown_routes_and_methods(admin: Admin) -> None:
    assert error(admin("GET", "/nothing"), 404)["code"] == "unknown_route"
    assert error(admin("POST", "/prices"), 405)["code"] == "method_not_allowed"


def test_a_database_error_is_503(admin: Admin) -> None:
    admin.conn.close()
    details = error(admin("GET", "/tenants"), 503)
    assert (details["type"], details["code"]) == ("service_unavailable", "database_unavailable")


def test_an_empty_token_is_refused(ledger: Connection) -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        create_app(ledger, "")

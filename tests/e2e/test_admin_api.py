"""The admin API of a real `gateway serve` in front of a real `gateway sim`: what it creates serves
on the OpenAI API, and what it changes holds within a second."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import procs
from tests.support.openai_errors import error

pytestmark = pytest.mark.e2e

TOKEN = "e2e-admin-token"
MODEL = "sim-model"
ADMIN_LISTENING = r"admin API listening on (http://\S+)"


@dataclass
class AdminStack:
    gateway: procs.Process
    sim: procs.Process
    admin_url: str

    def admin(self, method: str, path: str, token: str | None = TOKEN, **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        headers |= kw.pop("headers", {})
        url = f"{self.admin_url}/admin/v1{path}"
        return httpx.request(method, url, headers=headers, timeout=10, **kw)

    def chat(self, key: str) -> httpx.Response:
        return httpx.post(
            f"{self.gateway.url}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers={"authorization": f"Bearer {key}"},
            timeout=30,
        )

    def new_key(self, tenant: str) -> dict[str, Any]:
        assert self.admin("POST", "/tenants", json={"name": tenant}).status_code == 201
        issued = self.admin("POST", f"/tenants/{tenant}/keys", json={"name": "e2e"})
        assert issued.status_code == 201
        key: dict[str, Any] = issued.json()
        return key


def start_gateway(tmp: Path, sim: procs.Process, token: str) -> procs.Process:
    config = procs.write_config(
        tmp / "gateway.toml", [sim.url], tmp / "ledger.db", "[admin]\nport = 0\n"
    )
    return procs.start(["serve", "--config", str(config)], env={"TOKENGATE_ADMIN_TOKEN": token})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminStack]:
    sim = procs.start_sim()
    gateway = start_gateway(tmp_path_factory.mktemp("admin"), sim, TOKEN)
    admin_url = procs.wait_line(gateway, ADMIN_LISTENING).group(1)
    yield AdminStack(gateway=gateway, sim=sim, admin_url=admin_url)
    gateway.stop()
    sim.stop()


def within(seconds: float, condition: Any) -> float:
    """Polls `condition` until it holds; returns how long that took (fails after `seconds`)."""
    start = time.monotonic()
    assert procs.wait_for(condition, timeout=seconds, interval=0.02)
    return time.monotonic() - start


def test_the_admin_api_refuses_a_missing_or_wrong_token(stack: AdminStack) -> None:
    assert error(stack.admin("GET", "/tenants", token=None), 401)["code"] == "missing_admin_token"
    assert error(stack.admin("GET", "/tenants", token="nope"), 401)["code"] == (
        "invalid_admin_token"
    )
    assert stack.admin("GET", "/openapi.json", token=None).status_code == 401
    assert stack.admin("GET", "/tenants").status_code == 200


def test_openapi_lists_the_routes(stack: AdminStack) -> None:
    schema = stack.admin("GET", "/openapi.json").json()
    assert {
        "/admin/v1/tenants",
        "/admin/v1/tenants/{tenant}/keys",
        "/admin/v1/keys/{key_id}",
        "/admin/v1/tenants/{tenant}/quota",
        "/admin/v1/keys/{key_id}/quota",
        "/admin/v1/prices/{model}",
        "/admin/v1/prices",
    } <= set(schema["paths"])


def test_a_key_issued_through_the_api_serves_and_its_revocation_holds(stack: AdminStack) -> None:
    key = stack.new_key("made-by-api")
    assert key["key"].startswith("tg-")
    within(2.0, lambda: stack.chat(key["key"]).status_code == 200)
    assert stack.admin("DELETE", f"/keys/{key['id']}").status_code == 200
    assert within(2.0, lambda: stack.chat(key["key"]).status_code == 401) < 1.5


def test_a_quota_set_through_the_api_holds_within_a_second(stack: AdminStack) -> None:
    key = stack.new_key("quota-tenant")
    within(2.0, lambda: stack.chat(key["key"]).status_code == 200)

    policy = {"models": ["another-model"], "requests_per_minute": 1000}
    assert stack.admin("PUT", "/tenants/quota-tenant/quota", json=policy).status_code == 200
    assert stack.admin("GET", "/tenants/quota-tenant/quota").json() == {
        "requests_per_minute": 1000,
        "tokens_per_minute": None,
        "max_concurrent": None,
        "max_sequences": None,
        "token_budget": None,
        "money_budget_micros": None,
        "budget_period": "month",
        "models": ["another-model"],
        "weight": 1,
        "priority": "interactive",
    }
    assert within(2.0, lambda: stack.chat(key["key"]).status_code != 200) < 1.5
    refused = stack.chat(key["key"])
    assert 400 <= refused.status_code < 500
    assert refused.status_code != 401
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}

    assert stack.admin("DELETE", "/tenants/quota-tenant/quota").status_code == 204
    assert within(2.0, lambda: stack.chat(key["key"]).status_code == 200) < 1.5


def test_bad_bodies_get_400_with_the_error_shape(stack: AdminStack) -> None:
    stack.admin("POST", "/tenants", json={"name": "bad-bodies"})
    zero = stack.admin("PUT", "/tenants/bad-bodies/quota", json={"requests_per_minute": 0})
    assert error(zero, 400)["param"] == "requests_per_minute"
    malformed = stack.admin(
        "PUT",
        "/tenants/bad-bodies/quota",
        content=b"{",
        headers={"content-type": "application/json"},
    )
    assert error(malformed, 400)["type"] == "invalid_request_error"
    assert error(stack.admin("POST", "/tenants", json={"name": "bad-bodies"}), 409)["code"] == (
        "conflict"
    )
    assert error(stack.admin("GET", "/tenants/nobody"), 404)["code"] == "not_found"


def test_the_admin_api_is_off_without_its_token(tmp_path: Path) -> None:
    sim = procs.start_sim()
    try:
        gateway = start_gateway(tmp_path, sim, token="")
        procs.wait_line(
            gateway,
            r"admin API disabled: set the environment variable "
            r"TOKENGATE_ADMIN_TOKEN",
        )
        assert gateway.stop() == 0
        assert not any("admin API listening" in line for line in gateway.output)
    finally:
        sim.stop()


def test_serve_stops_cleanly_with_the_admin_api_running(tmp_path: Path) -> None:
    sim = procs.start_sim()
    try:
        gateway = start_gateway(tmp_path, sim, TOKEN)
        admin_url = procs.wait_line(gateway, ADMIN_LISTENING).group(1)
        with httpx.Client(headers={"authorization": f"Bearer {TOKEN}"}) as client:
            # A kept-alive connection stays open while the gateway stops.
            assert client.get(f"{admin_url}/admin/v1/tenants").status_code == 200
            started = time.monotonic()
            assert gateway.stop() == 0
            assert time.monotonic() - started < 10
        assert any("stopped;" in line for line in gateway.output)
    finally:
        sim.stop()

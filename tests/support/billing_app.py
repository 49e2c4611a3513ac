"""The billing and admin app in-process (ASGI, no socket) over a real ledger, and a ledger seeded
with two tenants: what the billing and admin API tests share."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gateway.admin import create_app
from gateway.config import BillingConfig
from gateway.ledger.apikeys import create_key
from gateway.ledger.db import Connection
from gateway.ledger.prices import set_price
from gateway.ledger.tenants import Tenant, create_tenant
from gateway.ledger.usage import insert_usage_events
from tests.support.events import ms, price, usage_event

__all__ = [
    "ADMIN",
    "BILLING",
    "JAN",
    "PRICE",
    "PRICED",
    "UNPRICED",
    "Billing",
    "Seeded",
    "ids",
]

ADMIN = "admin-secret-token"
BILLING = "billing-secret-token"
PRICED, UNPRICED = "sim-model", "free-model"
# Per million tokens: 0.15 prompt, 0.075 cached, 0.60 completion.
PRICE = price(prompt=150_000, cached=75_000, completion=600_000)
JAN = ms("2026-01-10T10:00:00")


class Billing:
    """Sends requests to an app over `conn`, on this thread (the one that owns `conn`)."""

    def __init__(
        self, conn: Connection, admin: str | None = ADMIN, billing: str | None = BILLING
    ) -> None:
        self.conn = conn
        self.app = create_app(conn, admin, billing, BillingConfig(currency="EUR"))

    def __call__(
        self, path: str, token: str | None = BILLING, method: str = "GET", **kwargs: Any
    ) -> httpx.Response:
        # Latin-1, as HTTP carries header bytes: a non-ASCII token must be refused, not crash.
        headers: dict[bytes, bytes] = {}
        if token is not None:
            headers[b"authorization"] = f"Bearer {token}".encode("latin-1")
        for name, value in kwargs.pop("headers", {}).items():
            headers[name.encode()] = value.encode("latin-1")

        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
                return await client.request(method, path, headers=headers, **kwargs)

        return asyncio.run(send())

    def events(self, token: str = BILLING, **params: Any) -> dict[str, Any]:
        response = self("/v1/billing/usage-events", token, params=params)
        assert response.status_code == 200, response.text
        page: dict[str, Any] = response.json()
        return page


class Seeded:
    """Two tenants, a key each, a price for `PRICED` from the start of 2026 and none for
    `UNPRICED`."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.acme, self.beta = create_tenant(conn, "acme"), create_tenant(conn, "beta")
        acme_key, beta_key = create_key(conn, "acme"), create_key(conn, "beta")
        self.acme_key, self.acme_key_id = acme_key.key, acme_key.record.id
        self.beta_key, self.beta_key_id = beta_key.key, beta_key.record.id
        set_price(conn, PRICED, PRICE, ms("2026-01-01T00:00:00"))

    def record(self, tenant: Tenant, count: int = 1, **fields: Any) -> list[str]:
        """Stores `count` events of `tenant` (one transaction); returns their ids."""
        key_id = self.acme_key_id if tenant is self.acme else self.beta_key_id
        events = [
            usage_event(**{"tenant_id": tenant.id, "key_id": key_id, "started_at_ms": JAN} | fields)
            for _ in range(count)
        ]
        insert_usage_events(self.conn, events)
        return [event.event_id for event in events]


def ids(page: dict[str, Any]) -> list[str]:
    return [event["id"] for event in page["data"]]

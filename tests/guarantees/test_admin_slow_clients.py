"""The admin listener (the admin and billing APIs) bounds the time a client may take (guarantee
6): `server.header_read_timeout_ms` for a request's headers, an idle connection's next request
included, and `server.body_read_timeout_ms` for its body, then 408 `request_timeout`; what is not
HTTP at all is 400, with the OpenAI error body too. A real `gateway serve` with bounds of half a
second; each test holds a connection as a hostile client would and waits for the gateway to cut
it, within a generous outer bound (`until_closed`)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.support import procs
from tests.support.slow_client import OUTER_S, TIMEOUTS, connection, until_closed

pytestmark = pytest.mark.e2e

TOKEN = "slow-clients-admin-token"
AUTH = f"Authorization: Bearer {TOKEN}\r\n"


@dataclass
class Admin:
    gateway: procs.Process
    url: str


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Admin]:
    tmp = tmp_path_factory.mktemp("admin-slow-clients")
    sim = procs.start_sim()
    config = procs.write_config(
        tmp / "gateway.toml", [sim.url], tmp / "ledger.db", "[admin]\nport = 0\n", server=TIMEOUTS
    )
    gateway = procs.start(["serve", "--config", str(config)], env={"TOKENGATE_ADMIN_TOKEN": TOKEN})
    try:
        url = procs.wait_line(gateway, r"admin API listening on (http://\S+)").group(1)
        yield Admin(gateway, url)
    finally:
        gateway.stop()
        sim.stop()


def timed_out(received: bytes) -> None:
    """`received` is one 408 with the OpenAI error body, `request_timeout`, closing."""
    head, _, body = received.partition(b"\r\n\r\n")
    status, *headers = head.split(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout", received
    assert b"connection: close" in [h.lower() for h in headers], received
    details = json.loads(body)["error"]
    assert set(details) == {"message", "type", "param", "code"}
    assert (details["code"], details["type"]) == ("request_timeout", "invalid_request_error")


def test_headers_trickled_a_byte_at_a_time_are_cut(admin: Admin) -> None:
    # At a byte every 0.1 s, these headers would take longer than `OUTER_S` to arrive.
    for path in ("/admin/v1/tenants", "/v1/billing/usage-events"):
        head = f"GET {path} HTTP/1.1\r\nHost: admin\r\n{AUTH}X-Trickle: ".encode() + b"a" * 200
        with connection(admin.url) as sock:
            received, _ = until_closed(sock, head)
        assert received == b""


def test_a_connection_that_sends_nothing_is_closed(admin: Admin) -> None:
    with connection(admin.url) as sock:
        received, _ = until_closed(sock)
    assert received == b""


def test_a_kept_alive_connections_next_request_has_the_header_bound(admin: Admin) -> None:
    request = f"GET /admin/v1/tenants HTTP/1.1\r\nHost: admin\r\n{AUTH}\r\n".encode()
    with connection(admin.url) as sock:
        sock.sendall(request)
        # The next request's headers trickle in after the first answer.
        received, _ = until_closed(
            sock, request.removesuffix(b"\r\n") + b"X-Trickle: " + b"a" * 200
        )
    assert received.startswith(b"HTTP/1.1 200 OK\r\n"), received
    assert received.count(b"HTTP/1.1") == 1, received


def test_a_body_that_never_arrives_is_408_and_closed(admin: Admin) -> None:
    head = (
        f"POST /admin/v1/tenants HTTP/1.1\r\nHost: admin\r\n{AUTH}"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    ).encode()
    with connection(admin.url) as sock:
        sock.sendall(head)
        received, _ = until_closed(sock)
    timed_out(received)


def test_a_body_trickled_a_byte_at_a_time_is_408_and_closed(admin: Admin) -> None:
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
        f"{admin.url}/admin/v1/tenants", headers={"authorization": f"Bearer {TOKEN}"}, timeout=10
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
    admin: Admin, request_head: bytes
) -> None:
    with connection(admin.url) as sock:
        sock.sendall(request_head)
        received, _ = until_closed(sock)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), received
    details = json.loads(body)["error"]
    assert set(details) == {"message", "type", "param", "code"}
    assert details["type"] == "invalid_request_error"


def test_clients_within_the_bounds_are_served_on_one_connection(admin: Admin) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=admin.url, headers=headers, timeout=OUTER_S) as client:
        created = client.post("/admin/v1/tenants", json={"name": "patient"})
        assert created.status_code == 201, created.text
        listed = client.get("/admin/v1/tenants")
        assert [t["name"] for t in listed.json()["data"]] == ["patient"]
        assert client.get("/v1/billing/usage-events").status_code == 200


def test_the_gateway_logged_no_error(admin: Admin) -> None:
    """Run last: the application, cut off from a body, answered nobody and raised nothing."""
    logged = "".join(admin.gateway.output)
    assert not re.search(r"Traceback|ERROR|Exception", logged), logged[-3000:]

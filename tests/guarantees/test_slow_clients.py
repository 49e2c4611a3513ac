"""Every listener bounds the time a client may take (guarantee 6): headers, a body, and a worker
that falls silent mid-stream. Each test holds a connection the way a hostile client would and
waits for the gateway to cut it, within a generous outer bound; none waits on a fixed time."""

from __future__ import annotations

import json
import os
import signal

import grpc
import httpx
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ResponseReceived, TrailersReceived

from tests.support import procs
from tests.support.slow_client import OUTER_S, TIMEOUTS, connection, until_closed
from tests.support.stack import Stack, StackFactory

pytestmark = pytest.mark.e2e

MODEL = "sim-model"


@pytest.fixture
def stack(make_stack: StackFactory) -> Stack:
    return make_stack(
        n_sims=2, server=TIMEOUTS, routing="stream_idle_timeout_ms = 1000\n", itl_ms=5
    )


def test_headers_trickled_a_byte_at_a_time_are_cut(stack: Stack) -> None:
    head = b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nX-Trickle: " + b"a" * 200
    with connection(stack.gateway.url) as sock:
        _, after = until_closed(sock, head)
    assert after < OUTER_S


def test_an_idle_connection_is_closed(stack: Stack) -> None:
    with connection(stack.gateway.url) as sock:
        received, _ = until_closed(sock)
    assert received == b"" or received.startswith(b"HTTP/1.1 408"), received


def test_a_body_that_never_arrives_is_408_and_closed(stack: Stack) -> None:
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


def test_a_worker_that_falls_silent_mid_stream_is_cut_billed_and_taken_out(stack: Stack) -> None:
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


GRPC = "[grpc]\nport = 0\n"


@pytest.fixture
def grpc_stack(make_stack: StackFactory) -> tuple[Stack, str]:
    stack = make_stack(n_sims=1, config_extra=GRPC, server=TIMEOUTS, itl_ms=1)
    target = procs.wait_line(stack.gateway, r"gRPC API listening on (\S+)")[1]
    return stack, f"http://{target}"


def test_a_grpc_connection_without_a_call_is_closed(grpc_stack: tuple[Stack, str]) -> None:
    _, url = grpc_stack
    with connection(url) as sock:
        until_closed(sock)
    # The HTTP/2 preface, a byte at a time, never becomes a call.
    with connection(url) as sock:
        until_closed(sock, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" * 4)


def test_a_grpc_request_message_that_never_arrives_is_deadline_exceeded(
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

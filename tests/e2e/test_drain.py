"""Graceful drain, under load: on SIGTERM `/ready` answers 503 and gRPC health NOT_SERVING while
both listeners go on serving for `server.drain_seconds`; then they close, the requests in flight
(streams included) finish, each has its one usage event in the ledger, and the process exits 0.
With `drain_seconds = 0` the listeners close at once, as they did before there was a window.

Nothing here waits on time: the load clients stop after a count of successes once they have seen
`/ready` answer 503, and a long stream outlives the window by construction (the simulator paces its
tokens, so a stream of `LONG_TOKENS` lasts at least `LONG_TOKENS * ITL_MS`)."""

from __future__ import annotations

import functools
import os
import signal
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.grpc import GatewayClient
from tests.support import procs
from tests.support.stack import Stack, StackFactory

pytestmark = pytest.mark.e2e

MODEL = "sim-model"
GRPC = "[grpc]\nport = 0\n"
SERVICE = "gateway.v1.InferenceService"
ITL_MS = 10
DRAIN_S = 8
# At least 20 s of generation: begun once `/ready` is 503, it is still streaming when the listeners
# close DRAIN_S after the signal.
LONG_TOKENS = 2000
# Successful requests each load client makes after it has seen `/ready` answer 503.
AFTER_503 = 5
GRACE_S = 60.0
DEADLINE_S = 60.0


@dataclass
class Outcome:
    request_id: str
    # None when the answer was 200 (or OK) and complete; else what went wrong.
    error: str | None
    # The client had seen `/ready` answer 503 when it sent the request.
    after_503: bool = False
    # The response's `Connection` header (HTTP only).
    connection: str | None = None


def grpc_target(stack: Stack) -> str:
    return procs.wait_line(stack.gateway, r"gRPC API listening on (\S+)")[1]


def http_call(
    stack: Stack, http: httpx.Client, stream: bool, max_tokens: int
) -> Callable[[str], Outcome]:
    def call(request_id: str) -> Outcome:
        body: dict[str, object] = {"model": MODEL, "prompt": "x", "max_tokens": max_tokens}
        headers = {"authorization": f"Bearer {stack.key}", "x-request-id": request_id}
        try:
            if stream:
                body["stream"] = True
                with http.stream(
                    "POST", f"{stack.base_url}/completions", json=body, headers=headers
                ) as r:
                    events = list(procs.sse_events(r.iter_lines()))
                    complete = events[-1:] == ["[DONE]"]
            else:
                r = http.post(f"{stack.base_url}/completions", json=body, headers=headers)
                complete = (
                    r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens
                )
        except httpx.HTTPError as exc:
            return Outcome(request_id, repr(exc))
        error = None if r.status_code == 200 and complete else f"HTTP {r.status_code}: incomplete"
        return Outcome(request_id, error, connection=r.headers.get("connection"))

    return call


def grpc_call(client: GatewayClient, stream: bool, max_tokens: int) -> Callable[[str], Outcome]:
    def call(request_id: str) -> Outcome:
        try:
            if stream:
                chunks = list(
                    client.stream_complete(MODEL, "x", request_id=request_id, max_tokens=max_tokens)
                )
                tokens = chunks[-1].usage.completion_tokens if chunks else 0
            else:
                tokens = client.complete(
                    MODEL, "x", request_id=request_id, max_tokens=max_tokens
                ).usage.completion_tokens
        except grpc.RpcError as exc:
            return Outcome(request_id, f"{exc.code()}: {exc.details()}")
        return Outcome(request_id, None if tokens == max_tokens else f"{tokens} tokens")

    return call


class Load:
    """Clients that each send one request after another until they have made `AFTER_503`
    successful ones after `ready_off` is set, or one fails."""

    def __init__(self) -> None:
        self.ready_off = threading.Event()
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def start(self, name: str, call: Callable[[str], Outcome]) -> None:
        def run() -> None:
            after = 0
            for n in range(1_000_000):
                after_503 = self.ready_off.is_set()
                outcome = call(f"{name}-{n}")
                outcome.after_503 = after_503
                with self._lock:
                    self.outcomes.append(outcome)
                if outcome.error is not None:
                    return
                after += after_503
                if after >= AFTER_503:
                    return

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def started(self, name: str) -> bool:
        with self._lock:
            return any(o.request_id.startswith(f"{name}-") for o in self.outcomes)


def ready(stack: Stack) -> httpx.Response:
    return httpx.get(f"{stack.gateway.url}/ready", timeout=10)


def health(target: str) -> tuple[int, int]:
    """The gRPC health service's answers for the server ("") and the inference service."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        server, service = (
            stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            for name in ("", SERVICE)
        )
    return server, service


def refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_under_load_drains_without_a_failed_request(make_stack: StackFactory) -> None:
    stack = make_stack(
        n_sims=2,
        config_extra=GRPC,
        grace_s=GRACE_S,
        server=f"drain_seconds = {DRAIN_S}",
        itl_ms=ITL_MS,
        max_output_tokens=LONG_TOKENS,
    )
    target = grpc_target(stack)
    answer = ready(stack)
    assert (answer.status_code, answer.json()) == (200, {"status": "ready"})
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert procs.wait_for(lambda: health(target) == (serving, serving)), health(target)

    load = Load()
    http = httpx.Client(timeout=30)
    clients = [GatewayClient(target, stack.key, timeout=30) for _ in range(2)]
    try:
        for i in range(2):
            load.start(f"http-{i}", http_call(stack, http, stream=False, max_tokens=2))
            load.start(f"http-stream-{i}", http_call(stack, http, stream=True, max_tokens=2))
            load.start(f"grpc-{i}", grpc_call(clients[i], stream=False, max_tokens=2))
            load.start(f"grpc-stream-{i}", grpc_call(clients[i], stream=True, max_tokens=2))
        names = [t.name for t in load.threads]
        assert procs.wait_for(lambda: all(map(load.started, names)), timeout=DEADLINE_S)

        stack.gateway.proc.send_signal(signal.SIGTERM)
        assert procs.wait_for(lambda: ready(stack).status_code == 503, timeout=DEADLINE_S)
        load.ready_off.set()
        assert ready(stack).json() == {"status": "draining"}
        # A second signal does not cut the window short.
        os.kill(stack.gateway.proc.pid, signal.SIGTERM)

        # Begun inside the window, these two are still streaming when the listeners close.
        long_done = threading.Event()
        long_outcomes: list[Outcome] = []

        def long_streams() -> None:
            with httpx.Client(timeout=DEADLINE_S) as long_http:
                calls = {
                    "long-http": http_call(stack, long_http, True, LONG_TOKENS),
                    "long-grpc": grpc_call(clients[0], True, LONG_TOKENS),
                }
                threads = [
                    threading.Thread(target=lambda n: long_outcomes.append(calls[n](n)), args=(n,))
                    for n in calls
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            long_done.set()

        long_thread = threading.Thread(target=long_streams, daemon=True)
        long_thread.start()

        assert procs.wait_for(lambda: health(target) == (not_serving, not_serving)), health(target)
        for thread in load.threads:
            thread.join(timeout=DEADLINE_S)
            assert not thread.is_alive(), thread.name
        # Both listeners close once the window is over, while the long streams still run.
        for url in (stack.gateway.url, f"http://{target}"):
            assert procs.wait_for(
                functools.partial(refuses_connections, url),
                timeout=DRAIN_S + DEADLINE_S,
                interval=0.2,
            )
        assert not long_done.is_set(), "the long streams ended before the listeners closed"
        long_thread.join(timeout=GRACE_S)
        assert long_done.is_set()
        status = stack.gateway.proc.wait(timeout=DEADLINE_S)
    finally:
        http.close()
        for client in clients:
            client.close()
    stack.gateway.stop()  # joins the output reader
    output = "".join(stack.gateway.output)
    assert status == 0, output

    outcomes = load.outcomes + long_outcomes
    failed = [o for o in outcomes if o.error is not None]
    assert not failed, failed
    assert sorted(o.request_id for o in long_outcomes) == ["long-grpc", "long-http"]
    # Every client went on being served once `/ready` said 503, each HTTP answer asking it to
    # reconnect elsewhere.
    for name in names:
        after = [o for o in load.outcomes if o.request_id.startswith(f"{name}-") and o.after_503]
        assert len(after) == AFTER_503, name
        if name.startswith("http"):
            assert {o.connection for o in after} == {"close"}, name

    rows = procs.usage_rows(stack.db)
    recorded = Counter(row["request_id"] for row in rows)
    assert recorded == Counter(o.request_id for o in outcomes)
    assert all(row["status"] == "completed" and row["http_status"] == 200 for row in rows), rows
    long_rows = [row for row in rows if row["request_id"].startswith("long-")]
    assert [row["completion_tokens"] for row in long_rows] == [LONG_TOKENS, LONG_TOKENS]
    assert f"stopped; {len(outcomes)} usage events recorded" in output, output
    assert "already stopping" in output, output
    assert "Traceback" not in output, output


def test_without_a_drain_window_sigterm_closes_the_listener_at_once(
    make_stack: StackFactory,
) -> None:
    # `drain_seconds = 0` is what the tests' configuration says unless a test asks for a window.
    tokens = 500
    stack = make_stack(n_sims=1, grace_s=GRACE_S, itl_ms=ITL_MS, max_output_tokens=tokens)
    assert ready(stack).status_code == 200
    first_chunk = threading.Event()
    outcome: list[Outcome] = []

    def stream() -> None:
        body = {"model": MODEL, "prompt": "x", "max_tokens": tokens, "stream": True}
        headers = {"authorization": f"Bearer {stack.key}", "x-request-id": "long"}
        with (
            httpx.Client(timeout=DEADLINE_S) as http,
            http.stream("POST", f"{stack.base_url}/completions", json=body, headers=headers) as r,
        ):
            events = []
            for event in procs.sse_events(r.iter_lines()):
                first_chunk.set()
                events.append(event)
        complete = r.status_code == 200 and events[-1:] == ["[DONE]"]
        outcome.append(
            Outcome("long", None if complete else f"HTTP {r.status_code}: {events[-1:]}")
        )

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert first_chunk.wait(DEADLINE_S)
    stack.gateway.proc.send_signal(signal.SIGTERM)
    assert procs.wait_for(lambda: refuses_connections(stack.gateway.url), timeout=DEADLINE_S)
    assert reader.is_alive(), "the stream ended before the listener closed"
    reader.join(timeout=GRACE_S)
    assert [o.error for o in outcome] == [None]
    status = stack.gateway.proc.wait(timeout=DEADLINE_S)
    stack.gateway.stop()
    output = "".join(stack.gateway.output)
    assert status == 0, output
    assert "draining:" not in output, output
    [row] = procs.usage_rows(stack.db)
    assert (row["request_id"], row["completion_tokens"]) == ("long", tokens)

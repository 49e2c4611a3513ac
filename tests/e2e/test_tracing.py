"""OpenTelemetry traces and the gateway-overhead histogram of a real `gateway serve` in front of a
real `gateway sim`: spans reach a real OTLP/gRPC receiver on loopback (opentelemetry-proto's
`TraceService` served by grpcio), one trace runs from the client's `traceparent` through the
gateway to the worker, and the control plane's own spans reach the same receiver."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from gateway.grpc import INFERENCE_SERVICE, GatewayClient, ServiceStub
from tests.support import procs
from tests.support.otlp import OtlpReceiver, ReceivedSpan, otlp_receiver
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

MODEL = "sim-model"
ADMIN_TOKEN = "admin-token-for-tracing"
# Every span of a request a worker answered, `gateway.request` its root.
REQUEST_SPANS = {
    "gateway.request",
    "gateway.admission",
    "gateway.route",
    "gateway.attempt",
    "gateway.first_byte",
    "gateway.relay",
    "gateway.metering",
}
# Children of the root; `gateway.first_byte` is the attempt's.
ROOT_CHILDREN = REQUEST_SPANS - {"gateway.request", "gateway.first_byte"}
SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER
CLIENT_KIND = 3


@dataclass
class Traced:
    receiver: OtlpReceiver
    gateway: procs.Process
    sim: procs.Process
    grpc_target: str
    admin_url: str
    db: Path
    key: str
    key_id: str


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[Traced]:
    with otlp_receiver() as (receiver, endpoint):
        sim = procs.start_sim(ttft_ms=20, itl_ms=1)
        db = tmp_path / "ledger.db"
        key, key_id = procs.create_key(db, "acme")
        extra = (
            "[grpc]\nport = 0\n"
            "[admin]\nport = 0\n"
            f'[telemetry]\notlp_endpoint = "{endpoint}"\nsample_ratio = 1.0\n'
        )
        config = procs.write_config(tmp_path / "gateway.toml", [sim.url], db, extra)
        # The batch processors (Rust and Python) export every 50 ms instead of every 5 s.
        env = {"OTEL_BSP_SCHEDULE_DELAY": "50", "TOKENGATE_ADMIN_TOKEN": ADMIN_TOKEN}
        gateway = procs.start(["serve", "--config", str(config)], env=env)
        try:
            yield Traced(
                receiver=receiver,
                gateway=gateway,
                sim=sim,
                grpc_target=procs.wait_line(gateway, r"gRPC API listening on (\S+)")[1],
                admin_url=procs.wait_line(gateway, r"admin API listening on (http://\S+)")[1],
                db=db,
                key=key,
                key_id=key_id,
            )
        finally:
            gateway.stop()
            sim.stop()


def traceparent(trace_id: str, parent_id: str) -> str:
    return f"00-{trace_id}-{parent_id}-01"


def spans_named(receiver: OtlpReceiver, trace_id: str, names: set[str]) -> dict[str, ReceivedSpan]:
    """The trace's spans by name, once every one of `names` has arrived."""

    def arrived() -> bool:
        return names <= {span.name for span in receiver.spans(trace_id)}

    assert procs.wait_for(arrived, timeout=30), [s.name for s in receiver.spans(trace_id)]
    spans = receiver.spans(trace_id)
    assert len(spans) == len({span.name for span in spans}), "one span of each name"
    return {span.name: span for span in spans}


def check_request_trace(
    traced: Traced, spans: dict[str, ReceivedSpan], client_parent: str, usage: dict[str, int]
) -> ReceivedSpan:
    """Asserts the request's spans and their parent chain; returns its attempt span."""
    root = spans["gateway.request"]
    assert root.parent_span_id == client_parent, "the gateway's root is the client's span's child"
    assert root.kind == SERVER_KIND
    assert root.service == "tokengate"
    assert root.scope == "tokengate"
    assert procs.wait_for(lambda: bool(procs.usage_rows(traced.db)))
    tenant_id = procs.usage_rows(traced.db)[0]["tenant_id"]
    assert root.attributes["tenant.id"] == tenant_id
    assert root.attributes["model"] == MODEL
    assert root.attributes["worker"] == traced.sim.url
    assert root.attributes["status"] == "completed"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["usage.source"] == "worker"
    assert root.attributes["usage.prompt_tokens"] == usage["prompt_tokens"]
    assert root.attributes["usage.completion_tokens"] == usage["completion_tokens"]
    for name in ROOT_CHILDREN:
        assert spans[name].parent_span_id == root.span_id, name
    attempt = spans["gateway.attempt"]
    assert attempt.kind == CLIENT_KIND
    assert attempt.attributes["worker"] == traced.sim.url
    assert attempt.attributes["outcome"] == "answered"
    assert attempt.attributes["attempt"] == 1
    assert spans["gateway.first_byte"].parent_span_id == attempt.span_id
    assert spans["gateway.route"].attributes["worker"] == traced.sim.url
    # A tenant's key, or its id, is never an attribute.
    for span in spans.values():
        for value in span.attributes.values():
            assert traced.key not in str(value), span
            assert traced.key_id not in str(value), span
    return attempt


def reached_worker(traced: Traced, trace_id: str, attempt: ReceivedSpan) -> None:
    """The worker got the trace, its parent the attempt span."""
    answer = httpx.get(f"{traced.sim.url}/sim/traceparents", timeout=5).json()
    assert traceparent(trace_id, attempt.span_id) in answer["traceparents"], answer


def test_an_http_stream_is_one_trace_from_the_client_through_the_gateway_to_the_worker(
    traced: Traced,
) -> None:
    trace_id, client_parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    usage: dict[str, int] = {}
    with httpx.stream(
        "POST",
        f"{traced.gateway.url}/v1/chat/completions",
        headers={
            "authorization": f"Bearer {traced.key}",
            "traceparent": traceparent(trace_id, client_parent),
            "tracestate": "client=1",
        },
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        timeout=30,
    ) as response:
        assert response.status_code == 200
        for payload in procs.sse_events(response.iter_lines()):
            if payload != "[DONE]" and json.loads(payload).get("usage"):
                usage = json.loads(payload)["usage"]
    assert usage["completion_tokens"] == 5
    spans = spans_named(traced.receiver, trace_id, REQUEST_SPANS)
    attempt = check_request_trace(traced, spans, client_parent, usage)
    root = spans["gateway.request"]
    assert root.attributes["surface"] == "http"
    assert root.attributes["endpoint"] == "chat.completions"
    assert root.attributes["stream"] is True
    reached_worker(traced, trace_id, attempt)


def test_a_grpc_call_is_one_trace_from_its_metadata_through_the_gateway_to_the_worker(
    traced: Traced,
) -> None:
    trace_id, client_parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    with grpc.insecure_channel(traced.grpc_target) as channel:
        stub = ServiceStub(channel, INFERENCE_SERVICE)
        answer = stub.Completion(
            GatewayClient.completion_request(MODEL, "hello there", max_tokens=4),
            metadata=(
                ("authorization", f"Bearer {traced.key}"),
                ("traceparent", traceparent(trace_id, client_parent)),
            ),
            timeout=30,
        )
    usage = {
        "prompt_tokens": answer.usage.prompt_tokens,
        "completion_tokens": answer.usage.completion_tokens,
    }
    assert usage["completion_tokens"] == 4
    spans = spans_named(traced.receiver, trace_id, REQUEST_SPANS)
    attempt = check_request_trace(traced, spans, client_parent, usage)
    root = spans["gateway.request"]
    assert root.attributes["surface"] == "grpc"
    assert root.attributes["endpoint"] == "completions"
    assert root.attributes["stream"] is False
    reached_worker(traced, trace_id, attempt)


def test_a_refused_request_is_traced_with_its_reason(traced: Traced) -> None:
    trace_id, client_parent = "5bf92f3577b34da6a3ce929d0e0e4736", "10f067aa0ba902b7"
    response = httpx.post(
        f"{traced.gateway.url}/v1/completions",
        headers={
            "authorization": "Bearer tg-not-a-key",
            "traceparent": traceparent(trace_id, client_parent),
        },
        json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
        timeout=30,
    )
    assert response.status_code == 401
    root = spans_named(traced.receiver, trace_id, {"gateway.request"})["gateway.request"]
    assert root.parent_span_id == client_parent
    assert root.attributes["status"] == "refused"
    assert root.attributes["http.response.status_code"] == 401
    assert root.attributes["error.reason"] == "invalid_api_key"
    assert "tenant.id" not in root.attributes
    # Nothing reached the worker, so no trace id did.
    answer = httpx.get(f"{traced.sim.url}/sim/traceparents", timeout=5).json()
    assert not any(trace_id in value for value in answer["traceparents"])


def test_the_control_planes_spans_reach_the_same_collector(traced: Traced) -> None:
    trace_id, client_parent = "6cf92f3577b34da6a3ce929d0e0e4736", "20f067aa0ba902b7"
    response = httpx.get(
        f"{traced.admin_url}/admin/v1/tenants",
        headers={
            "authorization": f"Bearer {ADMIN_TOKEN}",
            "traceparent": traceparent(trace_id, client_parent),
        },
        timeout=30,
    )
    assert response.status_code == 200
    span = spans_named(traced.receiver, trace_id, {"GET /admin/v1/tenants"})[
        "GET /admin/v1/tenants"
    ]
    assert span.parent_span_id == client_parent
    assert span.scope == "gateway.control"
    assert span.service == "tokengate"
    assert span.kind == SERVER_KIND
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["http.route"] == "/admin/v1/tenants"
    assert ADMIN_TOKEN not in json.dumps(span.attributes)
    # A usage event's way into the ledger is a span of its own batch.
    completion = httpx.post(
        f"{traced.gateway.url}/v1/completions",
        headers={"authorization": f"Bearer {traced.key}"},
        json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
        timeout=30,
    )
    assert completion.status_code == 200

    def ingested() -> list[ReceivedSpan]:
        return [s for s in traced.receiver.spans() if s.name == "ledger.ingest"]

    assert procs.wait_for(lambda: bool(ingested()), timeout=30)
    batch = ingested()[0]
    assert batch.scope == "gateway.control"
    assert batch.attributes["events"] >= 1
    assert batch.attributes["inserted"] >= 1


def test_gateway_overhead_leaves_out_the_workers_time(make_stack: StackFactory) -> None:
    """`tokengate_gateway_overhead_seconds` counts each request once, and each request's overhead
    fits in what its client waited less the worker's time to first token; relations that hold
    however busy the machine is (the worker's wait lies inside the client's and outside the
    gateway's)."""
    ttft_s = 0.1
    stack = make_stack(n_sims=1, ttft_ms=int(ttft_s * 1000), itl_ms=1)
    client = stack.client()
    waited = 0.0
    requests = 6
    for i in range(requests):
        started = time.monotonic()
        if i % 2:
            stream = client.completions.create(
                model=MODEL,
                prompt="hello",
                max_tokens=3,
                stream=True,
                stream_options={"include_usage": True},
            )
            assert len(list(stream)) >= 3
        else:
            answer = client.completions.create(model=MODEL, prompt="hello", max_tokens=3)
            assert answer.usage is not None
            assert answer.usage.completion_tokens == 3
        waited += time.monotonic() - started

    def metrics() -> dict[str, float]:
        return procs.scrape(stack.gateway.url)

    count = "tokengate_gateway_overhead_seconds_count"
    assert procs.wait_for(lambda: metrics().get(count) == requests), metrics()
    values = metrics()
    overhead = values["tokengate_gateway_overhead_seconds_sum"]
    assert values["tokengate_request_duration_seconds_count"] == requests
    assert 0 < overhead < values["tokengate_request_duration_seconds_sum"]
    assert overhead <= waited - requests * ttft_s, (overhead, waited)
    # Tracing off: no trace context went to the worker.
    sent = httpx.get(f"{stack.sims[0].url}/sim/traceparents", timeout=5).json()
    assert sent == {"traceparents": []}

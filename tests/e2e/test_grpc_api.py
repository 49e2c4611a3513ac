"""The gRPC API of a real `gateway serve` in front of real `gateway sim` workers, called with a
real grpcio client: unary and streaming generation, every error code, cancellation, health and
reflection, and usage events identical to those of the same request over HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from gateway.grpc import INFERENCE_SERVICE, GatewayClient, ServiceStub, pb
from gateway.ledger.db import open_ledger
from gateway.ledger.prices import set_price
from gateway.ledger.quotas import set_tenant_quota
from gateway.quotas import Price, QuotaPolicy
from tests.support import procs
from tests.support.proxy import CountingProxy
from tests.support.stack import Stack, StackFactory

pytestmark = pytest.mark.e2e

MODEL = "sim-model"
GRPC = "[grpc]\nport = 0\n"
# Usage events of one request over either surface differ only in these.
PER_CALL = {"event_id", "seq", "started_at_ms", "finished_at_ms", "recorded_at_ms"}


def grpc_target(stack: Stack) -> str:
    return procs.wait_line(stack.gateway, r"gRPC API listening on (\S+)")[1]


@pytest.fixture
def grpc_stack(make_stack: StackFactory) -> Iterator[tuple[Stack, GatewayClient]]:
    stack = make_stack(n_sims=1, config_extra=GRPC, itl_ms=1)
    with GatewayClient(grpc_target(stack), stack.key, timeout=30) as client:
        yield stack, client


def events(stack: Stack, count: int) -> list[dict[str, Any]]:
    assert procs.wait_for(lambda: len(stack.rows()) == count), stack.rows()
    return procs.usage_rows(stack.db)


def status_details(error: grpc.RpcError) -> status_pb2.Status:
    """The `google.rpc.Status` in an error's `grpc-status-details-bin` trailer."""
    trailers: Any = error.trailing_metadata()
    for key, value in trailers or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no status details")


def test_unary_chat_and_completion_answer_with_usage(
    grpc_stack: tuple[Stack, GatewayClient],
) -> None:
    stack, client = grpc_stack
    chat = client.chat(MODEL, [("user", "hello there")], max_tokens=5, request_id="chat-1")
    assert chat.choices[0].text
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 5
    assert chat.usage.prompt_tokens > 0
    assert chat.request_id == "chat-1"
    done = client.complete(MODEL, ["one", "two"], max_tokens=3, n=2)
    assert sorted(c.index for c in done.choices) == [0, 1, 2, 3]
    assert done.usage.completion_tokens == 12
    assert done.request_id  # the usage event's id when the client gives none
    rows = {row["request_id"]: row for row in events(stack, 2)}
    assert rows["chat-1"]["endpoint"] == "chat.completions"
    assert rows["chat-1"]["completion_tokens"] == 5
    assert rows[done.request_id]["stream"] == 0


def test_streaming_sends_text_as_generated_and_usage_last(
    grpc_stack: tuple[Stack, GatewayClient],
) -> None:
    stack, client = grpc_stack
    chunks = list(client.stream_chat(MODEL, [("user", "stream to me")], max_tokens=8))
    assert chunks[0].request_id
    assert all(not c.request_id for c in chunks[1:])
    text = [choice.text for c in chunks for choice in c.choices if choice.text]
    assert len(text) == 8
    assert [c.usage.completion_tokens for c in chunks if c.HasField("usage")] == [8]
    assert chunks[-1].HasField("usage")
    assert any(choice.finish_reason == "length" for c in chunks for choice in c.choices)
    [row] = events(stack, 1)
    assert (row["stream"], row["status"], row["completion_tokens"]) == (1, "completed", 8)


def test_models_lists_what_the_key_may_use(grpc_stack: tuple[Stack, GatewayClient]) -> None:
    _, client = grpc_stack
    [model] = client.models()
    assert model.id == MODEL
    assert model.max_model_len > 0


def test_a_grpc_request_and_the_same_http_request_record_identical_usage_events(
    grpc_stack: tuple[Stack, GatewayClient],
) -> None:
    stack, client = grpc_stack
    for stream in (False, True):
        params = {"max_tokens": 6, "seed": 7, "temperature": 0.5}
        request_id = f"same-{stream}"
        if stream:
            list(client.stream_complete(MODEL, "the same words", request_id=request_id, **params))
        else:
            client.complete(MODEL, "the same words", request_id=request_id, **params)
        body: dict[str, Any] = {"model": MODEL, "prompt": "the same words", **params}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        with httpx.Client(timeout=30) as http:
            answer = http.post(
                f"{stack.base_url}/completions",
                json=body,
                headers={"authorization": f"Bearer {stack.key}", "x-request-id": request_id},
            )
        assert answer.status_code == 200
    rows = events(stack, 4)
    for streamed in (0, 1):
        pair = [
            {k: v for k, v in row.items() if k not in PER_CALL}
            for row in rows
            if row["request_id"] == f"same-{bool(streamed)}"
        ]
        assert len(pair) == 2
        assert pair[0] == pair[1]
        assert pair[0]["stream"] == streamed
        assert pair[0]["completion_tokens"] == 6


def test_every_error_is_its_grpc_status(make_stack: StackFactory) -> None:
    stack = make_stack(n_sims=1, config_extra=GRPC, itl_ms=1)
    target = grpc_target(stack)
    hello = [("user", "hi")]

    def code_of(client: GatewayClient, **params: Any) -> grpc.RpcError:
        model = params.pop("model", MODEL)
        with pytest.raises(grpc.RpcError) as caught:
            client.chat(model, hello, max_tokens=2, **params)
        return caught.value

    with GatewayClient(target, "tg-not-a-key", timeout=30) as stranger:
        assert code_of(stranger).code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(target) as channel:
        stub = ServiceStub(channel, INFERENCE_SERVICE)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListModels(pb.ListModelsRequest(), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing API key" in (caught.value.details() or "")

    with GatewayClient(target, stack.key, timeout=30) as client:
        unknown = code_of(client, model="no-such-model")
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-model" in (unknown.details() or "")
        missing = code_of(client, model="")
        assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "`model`" in (missing.details() or "")
        with pytest.raises(grpc.RpcError) as caught:
            client.chat(MODEL, [("user", "x" * 70_000)], max_tokens=2)  # over max_body_bytes
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exceeds the limit" in (caught.value.details() or "")

        with open_ledger(procs.ledger_url(stack.db)) as conn:
            set_tenant_quota(conn, "acme", QuotaPolicy(money_budget_micros=1_000_000))
        assert procs.wait_for(
            lambda: _code(client, hello) == grpc.StatusCode.PERMISSION_DENIED, timeout=5
        )
        with open_ledger(procs.ledger_url(stack.db)) as conn:
            set_price(
                conn, MODEL, Price(prompt_per_mtok=1, cached_per_mtok=1, completion_per_mtok=1)
            )
            set_tenant_quota(conn, "acme", QuotaPolicy(requests_per_minute=1))
        assert procs.wait_for(
            lambda: _code(client, hello) == grpc.StatusCode.RESOURCE_EXHAUSTED, timeout=5
        )
        limited = code_of(client)
        assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = status_details(limited)
        assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        infos = {detail.type_url.rsplit("/", 1)[1]: detail for detail in details.details}
        retry = error_details_pb2.RetryInfo.FromString(infos["google.rpc.RetryInfo"].value)
        assert 0 < retry.retry_delay.ToMilliseconds() <= 60_000
        reason = error_details_pb2.ErrorInfo.FromString(infos["google.rpc.ErrorInfo"].value)
        assert (reason.reason, reason.domain) == ("rate_limit_exceeded", "tokengate")

        with open_ledger(procs.ledger_url(stack.db)) as conn:
            set_tenant_quota(conn, "acme", QuotaPolicy())
        stack.sims[0].stop()
        assert procs.wait_for(
            lambda: _code(client, hello) == grpc.StatusCode.UNAVAILABLE, timeout=10
        )


def test_a_session_id_in_metadata_is_checked_as_over_http(
    grpc_stack: tuple[Stack, GatewayClient],
) -> None:
    """`x-session-id` metadata is the HTTP header's `X-Session-Id`: taken when it is 1-256
    printable ASCII characters, else INVALID_ARGUMENT naming it."""
    stack, _ = grpc_stack
    request = GatewayClient.chat_request(MODEL, [("user", "hi")], max_tokens=2)
    auth = ("authorization", f"Bearer {stack.key}")
    with grpc.insecure_channel(grpc_target(stack)) as channel:
        stub = ServiceStub(channel, INFERENCE_SERVICE)
        answer = stub.ChatCompletion(
            request, metadata=[auth, ("x-session-id", "user-7")], timeout=30
        )
        assert answer.choices
        with pytest.raises(grpc.RpcError) as caught:
            stub.ChatCompletion(request, metadata=[auth, ("x-session-id", "s" * 257)], timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "X-Session-Id" in (caught.value.details() or "")


def test_bad_messages_are_the_clients_fault(make_stack: StackFactory) -> None:
    """Bytes that are no protobuf message, a message past the size limit, a request id of 1000
    characters: INVALID_ARGUMENT, as the README maps a 400 and a 413, never INTERNAL or
    OUT_OF_RANGE."""
    stack = make_stack(n_sims=1, config_extra=GRPC, itl_ms=1)
    target = grpc_target(stack)
    metadata = (("authorization", f"Bearer {stack.key}"),)
    with grpc.insecure_channel(target) as channel:
        raw = channel.unary_unary(
            "/gateway.v1.InferenceService/Completion",
            request_serializer=lambda body: body,
            response_deserializer=lambda body: body,
        )
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\x80", b"\x12" + b"\xff" * 9):
            with pytest.raises(grpc.RpcError) as caught:
                raw(garbage, metadata=metadata, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, garbage
        # Past twice `max_body_bytes` (64 KiB in these tests), where tonic stops reading.
        oversized = pb.CompletionRequest(model=MODEL, prompt=["x" * 300_000])
        with pytest.raises(grpc.RpcError) as caught:
            raw(oversized.SerializeToString(), metadata=metadata, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with GatewayClient(target, stack.key, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.complete(MODEL, "x", max_tokens=1, request_id="r" * 1000)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request id" in (caught.value.details() or "")
        assert client.complete(MODEL, "x", max_tokens=1).choices
    assert procs.wait_for(lambda: len(stack.rows()) == 1)


def _answers(call: Any) -> bool:
    """Whether `call` succeeds; False while its key is not yet known (any other error raises)."""
    try:
        call()
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
        return False
    return True


def _code(client: GatewayClient, messages: list[tuple[str, str]]) -> grpc.StatusCode | None:
    try:
        client.chat(MODEL, messages, max_tokens=2)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_a_deadline_that_passes_is_deadline_exceeded_and_billed_as_cancelled(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(n_sims=1, config_extra=GRPC, ttft_ms=3000)
    with GatewayClient(grpc_target(stack), stack.key) as client:
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            client.complete(MODEL, "slow", max_tokens=2, timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - began < 2.5
    [row] = events(stack, 1)
    assert (row["status"], row["completion_tokens"]) == ("cancelled", 0)


def test_a_cancelled_stream_cancels_the_worker_and_is_billed_for_what_was_sent(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(n_sims=1, config_extra=GRPC, itl_ms=30, max_output_tokens=500)
    with GatewayClient(grpc_target(stack), stack.key, timeout=30) as client:
        call = client.stream_complete(MODEL, "tell me a long story", max_tokens=400)
        received = 0
        for chunk in call:
            received += sum(1 for choice in chunk.choices if choice.text)
            if received == 10:
                break
        assert call.cancel()
    [row] = events(stack, 1)
    assert row["status"] == "cancelled"
    assert row["prompt_tokens"] == 6
    # What the gateway relayed: what this client read, and what was in flight towards it.
    assert 10 <= row["completion_tokens"] < 60
    sim = stack.sims[0]
    assert procs.wait_for(lambda: procs.scrape(sim.url)["vllm:num_requests_running"] == 0)
    assert int(procs.scrape(sim.url)["vllm:generation_tokens_total"]) < 80


def test_a_finished_stream_leaves_its_worker_connection_for_the_next_call(
    tmp_path: Path,
) -> None:
    """The gateway reads a worker's stream to its end before the call ends, so that the
    worker's connection goes back to the pool: ten streams, one after another, open at most a
    couple of connections to the worker, even when the end of its body comes well after
    `[DONE]` (the HTTP API's twin is in `rust/core/tests/gateway.rs`)."""
    sim = procs.start_sim()
    proxy = CountingProxy(sim.url, hold=(b"data: [DONE]\n\n", 0.2))
    db = tmp_path / "ledger.db"
    key, _ = procs.create_key(db, "acme")
    # Probes far apart and no load scrape: the calls alone use the pool.
    routing = "health_interval_ms = 60000\nload_interval_ms = 0\n"
    config = procs.write_config(tmp_path / "gateway.toml", [proxy.url], db, GRPC, routing=routing)
    gateway = procs.start(["serve", "--config", str(config)])
    try:
        target = procs.wait_line(gateway, r"gRPC API listening on (\S+)")[1]
        with GatewayClient(target, key, timeout=30) as client:
            list(client.stream_complete(MODEL, "x", max_tokens=4))
            before = proxy.accepted
            for _ in range(10):
                chunks = list(client.stream_complete(MODEL, "x", max_tokens=4))
                assert chunks[-1].usage.completion_tokens == 4
            opened = proxy.accepted - before
    finally:
        gateway.stop()
        proxy.close()
        sim.stop()
    # A connection may come back to the pool a moment after its body ends: a few new ones are
    # allowed, not one per stream.
    assert opened <= 2, f"{opened} connections for 10 streams"


def test_health_and_reflection(grpc_stack: tuple[Stack, GatewayClient]) -> None:
    stack, _ = grpc_stack
    with grpc.insecure_channel(grpc_target(stack)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "gateway.v1.InferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = ProtoReflectionDescriptorDatabase(channel)
        services = set(reflection.get_services())
        assert {"gateway.v1.InferenceService", "grpc.health.v1.Health"} <= services
        methods = {
            m.name
            for m in reflection.FindFileContainingSymbol("gateway.v1.InferenceService")
            .service[0]
            .method
        }
        assert methods == {
            "ChatCompletion",
            "StreamChatCompletion",
            "Completion",
            "StreamCompletion",
            "ListModels",
        }


def test_a_tenant_pages_its_own_usage_events_over_grpc(
    grpc_stack: tuple[Stack, GatewayClient],
) -> None:
    stack, client = grpc_stack
    other_key, _ = procs.create_key(stack.db, "other")
    with GatewayClient(grpc_target(stack), other_key, timeout=30) as other:
        # A new key works once the next key snapshot reaches the core.
        assert procs.wait_for(
            lambda: _answers(lambda: other.complete(MODEL, "not yours", max_tokens=1)), timeout=5
        )
        for i in range(5):
            client.complete(MODEL, f"mine {i}", max_tokens=2, request_id=f"mine-{i}")
        assert procs.wait_for(lambda: len(stack.rows()) == 6)
        seen: list[str] = []
        cursor = ""
        while True:
            page = client.usage_events(after=cursor, limit=2)
            seen += [event.request_id for event in page.events]
            cursor = page.next_cursor
            if not page.has_more:
                break
        assert seen == [f"mine-{i}" for i in range(5)]
        assert client.usage_events(after=cursor).events == []
        [theirs] = other.usage_events().events
        assert theirs.model == MODEL
        assert (theirs.tokens.completion_tokens, theirs.priced, theirs.HasField("cost_micros")) == (
            1,
            False,
            False,
        )
        with pytest.raises(grpc.RpcError) as caught:
            client.usage_events(after="not-a-cursor")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as caught:
            client.usage_events(limit=4_001)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(client.usage_events(limit=4_000).events) == 5
    with GatewayClient(grpc_target(stack), "tg-nobody", timeout=30) as stranger:
        with pytest.raises(grpc.RpcError) as caught:
            stranger.usage_events()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

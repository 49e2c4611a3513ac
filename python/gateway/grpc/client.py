"""`GatewayClient`: one channel to the gateway's gRPC API, the tenant's API key on every call.

Errors are `grpc.RpcError`s whose `code()` is the status the gateway answered (see the proto's
header for which code means what); a `RESOURCE_EXHAUSTED` status carries `google.rpc.RetryInfo`
in its details (`retry_delay`). Streaming methods return a `StreamCall`: iterate it for the chunks,
`cancel()` it to stop generation (billed for what was sent, like an HTTP client that goes away).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, Self, cast

import grpc

from gateway.grpc.stub import ServiceStub
from gateway.grpc.v1 import inference_pb2 as pb
from gateway.grpc.v1 import usage_pb2 as usage_pb

__all__ = ["INFERENCE_SERVICE", "USAGE_SERVICE", "GatewayClient", "StreamCall", "pb", "usage_pb"]

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"]
USAGE_SERVICE = usage_pb.DESCRIPTOR.services_by_name["UsageService"]

Message = Mapping[str, str] | tuple[str, str]
"""A chat message: `{"role": ..., "content": ..., "name"?: ...}`, or `(role, content)`."""


class StreamCall(Protocol):
    """A server-streaming call: its chunks, and a way to stop it."""

    def __iter__(self) -> Iterator[pb.GenerateChunk]: ...
    def __next__(self) -> pb.GenerateChunk: ...
    def cancel(self) -> bool: ...
    def code(self) -> grpc.StatusCode | None: ...


def _params(
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    n: int | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
) -> pb.SamplingParams:
    return pb.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        n=n,
        stop=list(stop),
        seed=seed,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
    )


def _message(message: Message) -> pb.ChatMessage:
    if isinstance(message, tuple):
        role, content = message
        return pb.ChatMessage(role=role, content=content)
    return pb.ChatMessage(
        role=message["role"], content=message["content"], name=message.get("name")
    )


class GatewayClient:
    """Calls `target` (`host:port`, plaintext) with `api_key`; `timeout` (seconds) is each call's
    deadline unless a call gives its own. Sampling keywords are `SamplingParams`' fields."""

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        timeout: float | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = ServiceStub(self._channel, INFERENCE_SERVICE)
        self._usage = ServiceStub(self._channel, USAGE_SERVICE)
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._timeout = timeout

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        return method(
            request,
            metadata=self._metadata,
            timeout=self._timeout if timeout is None else timeout,
        )

    def chat(
        self,
        model: str,
        messages: Sequence[Message],
        *,
        request_id: str = "",
        timeout: float | None = None,
        **params: Any,
    ) -> pb.GenerateResponse:
        request = self.chat_request(model, messages, request_id=request_id, **params)
        return cast(pb.GenerateResponse, self._call(self._stub.ChatCompletion, request, timeout))

    def stream_chat(
        self,
        model: str,
        messages: Sequence[Message],
        *,
        request_id: str = "",
        timeout: float | None = None,
        **params: Any,
    ) -> StreamCall:
        request = self.chat_request(model, messages, request_id=request_id, **params)
        return cast(StreamCall, self._call(self._stub.StreamChatCompletion, request, timeout))

    def complete(
        self,
        model: str,
        prompt: str | Sequence[str],
        *,
        request_id: str = "",
        timeout: float | None = None,
        **params: Any,
    ) -> pb.GenerateResponse:
        request = self.completion_request(model, prompt, request_id=request_id, **params)
        return cast(pb.GenerateResponse, self._call(self._stub.Completion, request, timeout))

    def stream_complete(
        self,
        model: str,
        prompt: str | Sequence[str],
        *,
        request_id: str = "",
        timeout: float | None = None,
        **params: Any,
    ) -> StreamCall:
        request = self.completion_request(model, prompt, request_id=request_id, **params)
        return cast(StreamCall, self._call(self._stub.StreamCompletion, request, timeout))

    def models(self, *, timeout: float | None = None) -> list[pb.Model]:
        answer = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return list(cast(pb.ListModelsResponse, answer).models)

    def usage_events(
        self, after: str = "", limit: int = 0, *, timeout: float | None = None
    ) -> usage_pb.ListUsageEventsResponse:
        """A page of the key's tenant's usage events after the cursor `after` ("" for the
        beginning); follow `next_cursor` for the next."""
        request = usage_pb.ListUsageEventsRequest(after=after, limit=limit)
        answer = self._call(self._usage.ListUsageEvents, request, timeout)
        return cast(usage_pb.ListUsageEventsResponse, answer)

    @staticmethod
    def chat_request(
        model: str, messages: Sequence[Message], *, request_id: str = "", **params: Any
    ) -> pb.ChatCompletionRequest:
        return pb.ChatCompletionRequest(
            model=model,
            messages=[_message(m) for m in messages],
            params=_params(**params),
            request_id=request_id,
        )

    @staticmethod
    def completion_request(
        model: str, prompt: str | Sequence[str], *, request_id: str = "", **params: Any
    ) -> pb.CompletionRequest:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return pb.CompletionRequest(
            model=model, prompt=prompts, params=_params(**params), request_id=request_id
        )

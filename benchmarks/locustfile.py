"""Locust users that stream chat and text completions through tokengate (or any vLLM endpoint).

    TOKENGATE_API_KEY=tg-... locust -f benchmarks/locustfile.py --headless -u 50 -r 10 -t 60s \\
        --host http://127.0.0.1:8000

Environment: ``TOKENGATE_API_KEY`` (sent as ``Authorization: Bearer``; unset sends no header, e.g.
against ``gateway sim`` directly), ``TOKENGATE_MODEL`` (default ``sim-model``),
``TOKENGATE_MAX_TOKENS`` (default 64), ``TOKENGATE_GRPC_TARGET`` (``host:port`` of the gateway's
gRPC API; with it, ``GrpcChatUser`` joins in). Name a class on the command line (``ChatUser``,
``CompletionUser``, ``GrpcChatUser``) to run only that one; by default locust spreads users over
all of them.

Each user sends one streaming request after another (no wait), with
``stream_options: {"include_usage": true}``, and reads the SSE stream to its end. Rows in the stats:

- ``POST /v1/...`` — the whole stream, from sending the request to ``data: [DONE]`` (locust's own
  figure for a streamed request would stop at the response headers). A failure is a non-200
  status, a transport error, an ``{"error": ...}`` frame, a stream without ``data: [DONE]``, or a
  stream without the usage chunk that was asked for.
- ``TTFT /v1/...`` — time to first token in ms: to the first frame whose ``choices`` is non-empty
  and carries non-empty ``delta.content`` (chat) or ``text`` (completions), as ``vllm bench serve``
  counts it.
- ``TPS /v1/...`` — **not a time**: its "response time" columns are output tokens per second per
  request, ``usage.completion_tokens`` from the final usage chunk divided by the request's
  end-to-end time in seconds; its "size" column is that request's completion token count.

``GrpcChatUser`` streams ``gateway.v1.InferenceService/StreamChatCompletion`` with grpcio, made
gevent-cooperative (``grpc.experimental.gevent.init_gevent()``) so its users share locust's loop.
Its rows, named ``StreamChatCompletion``: ``gRPC`` (end to end: the call until its status),
``TTFT`` (to the first message with text) and ``TPS`` (as above, from the last message's usage).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import HttpUser, User, constant, task

grpc_gevent.init_gevent()  # before any channel: grpcio then yields to gevent instead of blocking

API_KEY = os.environ.get("TOKENGATE_API_KEY", "")
MODEL = os.environ.get("TOKENGATE_MODEL", "sim-model")
MAX_TOKENS = int(os.environ.get("TOKENGATE_MAX_TOKENS", "64"))
GRPC_TARGET = os.environ.get("TOKENGATE_GRPC_TARGET", "")

PROMPTS = (
    "Write a haiku about GPUs.",
    "Explain what a KV cache is in two sentences.",
    "List three prime numbers greater than one hundred.",
    "Summarise the plot of Hamlet in one paragraph.",
    "What is the capital of Australia, and why is it not Sydney?",
)

if not API_KEY:
    logging.getLogger(__name__).warning(
        "TOKENGATE_API_KEY is not set: requests go without an Authorization header"
    )


class StreamError(Exception):
    """The stream was delivered with a 200 but is not a complete, well-formed answer."""


class StreamReader:
    """Incremental reader of an OpenAI-style SSE body: records when the first token arrived,
    the final usage, any error frame and whether ``data: [DONE]`` came."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.first_token_at: float | None = None
        self.completion_tokens: int | None = None
        self.error: str | None = None
        self.done = False
        self.length = 0
        self._buffer = b""

    def feed(self, chunk: bytes) -> None:
        self.length += len(chunk)
        self._buffer += chunk.replace(b"\r\n", b"\n")
        *events, self._buffer = self._buffer.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._data(line[5:].strip())

    def _data(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            frame = json.loads(payload)
        except ValueError:
            self.error = f"frame is not JSON: {payload[:100]!r}"
            return
        if not isinstance(frame, dict):
            return
        if "error" in frame:
            self.error = f"error frame: {json.dumps(frame['error'])[:200]}"
            return
        if self.first_token_at is None and _has_token(frame.get("choices")):
            self.first_token_at = time.perf_counter()
        usage = frame.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.completion_tokens = usage["completion_tokens"]

    def problem(self) -> str | None:
        """Why the stream is not a complete answer, or None when it is."""
        if self.error is not None:
            return self.error
        if not self.done:
            return "stream ended without data: [DONE]"
        if self.completion_tokens is None:
            return "no usage chunk although include_usage was requested"
        return None


def _has_token(choices: Any) -> bool:
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return False
    choice: dict[str, Any] = choices[0]
    delta = choice.get("delta")
    content = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return isinstance(content, str) and content != ""


def request_body(path: str, prompt: str) -> dict[str, Any]:
    """The streaming request a user sends to `path` (chat or text completions)."""
    common: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if path == "/v1/chat/completions":
        return {**common, "messages": [{"role": "user", "content": prompt}]}
    return {**common, "prompt": prompt}


class _StreamingUser(HttpUser):
    abstract = True
    wait_time = constant(0)
    path = ""

    def on_start(self) -> None:
        self.headers = {"Accept": "text/event-stream"}
        if API_KEY:
            self.headers["Authorization"] = f"Bearer {API_KEY}"

    def stream_once(self) -> None:
        body = request_body(self.path, random.choice(PROMPTS))
        start = time.perf_counter()
        reader = StreamReader(start)
        with self.client.post(
            self.path,
            json=body,
            headers=self.headers,
            stream=True,
            catch_response=True,
            name=self.path,
        ) as resp:
            if resp.status_code != 200:
                detail = resp.text[:200] if resp.status_code else repr(getattr(resp, "error", ""))
                resp.failure(f"HTTP {resp.status_code}: {detail}")
                return
            try:
                # chunk_size=None: each chunk as it arrives, so the first token is timed on arrival.
                for chunk in resp.iter_content(chunk_size=None):
                    reader.feed(chunk)
            except Exception as e:  # the transport broke mid-stream: a failed request
                reader.error = f"stream broken: {e!r}"
            end = time.perf_counter()
            resp.request_meta["response_time"] = (end - start) * 1000
            resp.request_meta["response_length"] = reader.length
            problem = reader.problem()
            if problem is not None:
                resp.failure(problem)
                return
        self._report(reader, end)

    def _report(self, reader: StreamReader, end: float) -> None:
        report_stream(
            self, self.path, reader.start, reader.first_token_at, end, reader.completion_tokens or 0
        )


def report_stream(
    user: User, name: str, start: float, first_token_at: float | None, end: float, tokens: int
) -> None:
    """Fires a stream's ``TTFT`` row (if a token came) and its ``TPS`` row."""
    fire = user.environment.events.request.fire
    if first_token_at is not None:
        fire(
            request_type="TTFT",
            name=name,
            response_time=(first_token_at - start) * 1000,
            response_length=0,
            exception=None,
            context={},
        )
    fire(
        request_type="TPS",
        name=name,
        response_time=tokens / max(end - start, 1e-9),
        response_length=tokens,
        exception=None,
        context={},
    )


class ChatUser(_StreamingUser):
    """Streaming ``/v1/chat/completions``."""

    path = "/v1/chat/completions"

    @task
    def chat(self) -> None:
        self.stream_once()


class CompletionUser(_StreamingUser):
    """Streaming ``/v1/completions``."""

    path = "/v1/completions"

    @task
    def complete(self) -> None:
        self.stream_once()


class GrpcChatUser(User):
    """Streaming ``gateway.v1.InferenceService/StreamChatCompletion`` over gRPC; only with
    ``TOKENGATE_GRPC_TARGET``."""

    abstract = not GRPC_TARGET
    wait_time = constant(0)
    name = "StreamChatCompletion"

    def on_start(self) -> None:
        from gateway.grpc import GatewayClient

        self.client = GatewayClient(GRPC_TARGET, API_KEY, timeout=300)

    def on_stop(self) -> None:
        self.client.close()

    @task
    def chat(self) -> None:
        start = time.perf_counter()
        first_token_at: float | None = None
        tokens: int | None = None
        length = 0
        error: Exception | None = None
        try:
            call = self.client.stream_chat(
                MODEL, [("user", random.choice(PROMPTS))], max_tokens=MAX_TOKENS
            )
            for chunk in call:
                length += chunk.ByteSize()
                if first_token_at is None and any(c.text for c in chunk.choices):
                    first_token_at = time.perf_counter()
                if chunk.HasField("usage"):
                    tokens = chunk.usage.completion_tokens
            if tokens is None:
                error = StreamError("no usage in the last message")
        except grpc.RpcError as e:
            error = e
        end = time.perf_counter()
        self.environment.events.request.fire(
            request_type="gRPC",
            name=self.name,
            response_time=(end - start) * 1000,
            response_length=length,
            exception=error,
            context={},
        )
        if error is None:
            report_stream(self, self.name, start, first_token_at, end, tokens or 0)

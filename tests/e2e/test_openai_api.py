"""The official `openai` SDK against a real `gateway serve` in front of real `gateway sim`: models,
completions and chats, streams and their usage, errors, metering, a revoked key, and the gateway's
own metrics."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.support import procs
from tests.support.stack import Stack, StackFactory

pytestmark = pytest.mark.e2e

MODEL = "sim-model"


def test_models_lists_what_workers_serve(stack: Stack) -> None:
    models = stack.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    direct = httpx.get(f"{stack.sims[0].url}/v1/models").json()["data"][0]
    via_gateway = httpx.get(
        f"{stack.base_url}/models", headers={"authorization": f"Bearer {stack.key}"}
    ).json()["data"][0]
    assert list(via_gateway) == list(direct)  # same card, same key order (vLLM's `root` kept)
    for card in (via_gateway, direct):
        # vLLM makes a fresh permission id and `created` time per call; the gateway relays the
        # card of its last probe.
        card.pop("permission")
        card.pop("created")
    assert via_gateway == direct


def test_chat_completion(stack: Stack) -> None:
    response = stack.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=5
    )
    assert response.choices[0].message.content
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None
    assert response.usage.completion_tokens == 5
    assert response.usage.prompt_tokens > 0


def test_completion_with_n_and_vllm_extras(stack: Stack) -> None:
    response = stack.client().completions.create(
        model=MODEL,
        prompt="one two three",
        max_tokens=3,
        n=2,
        extra_body={"top_k": 5, "min_p": 0.1, "ignore_eos": True},
    )
    assert sorted(c.index for c in response.choices) == [0, 1]
    assert response.usage is not None
    assert response.usage.completion_tokens == 6


def test_stream_without_usage_has_no_usage_anywhere(stack: Stack) -> None:
    stream = stack.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks if c.choices[0].delta.content) == 4


def test_stream_with_include_usage_ends_with_one_usage_chunk(stack: Stack) -> None:
    stream = stack.client().completions.create(
        model=MODEL,
        prompt="count to four",
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 4


def test_stream_with_continuous_usage_is_cumulative(stack: Stack) -> None:
    stream = stack.client().completions.create(
        model=MODEL,
        prompt="x",
        max_tokens=3,
        stream=True,
        extra_body={"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )
    counts = [c.usage.completion_tokens for c in stream if c.usage is not None]
    assert counts == [1, 2, 3, 3]


@pytest.mark.parametrize("stream", [False, True])
def test_relayed_bytes_equal_the_workers(stack: Stack, stream: bool) -> None:
    """Rule one: the client gets the worker's own bytes (ids and timestamps aside)."""
    body = {"model": MODEL, "prompt": "same bytes", "max_tokens": 4, "seed": 7, "stream": stream}
    headers = {"authorization": f"Bearer {stack.key}", "x-request-id": "fixed-id"}

    def normalise(text: str) -> str:
        return "\n".join(
            line
            if not line.startswith("data: {")
            else "data: " + json.dumps({**json.loads(line[6:]), "created": 0})
            for line in text.split("\n")
        )

    direct = httpx.post(f"{stack.sims[0].url}/v1/completions", json=body, headers=headers)
    via = httpx.post(f"{stack.base_url}/completions", json=body, headers=headers)
    assert via.status_code == direct.status_code == 200
    assert via.headers["content-type"] == direct.headers["content-type"]
    if stream:
        assert normalise(via.text) == normalise(direct.text)
    else:
        assert {**via.json(), "created": 0} == {**direct.json(), "created": 0}
        assert via.text.index('"usage"') == direct.text.index('"usage"')


class TestErrors:
    def test_missing_key_is_401(self, stack: Stack) -> None:
        response = httpx.post(f"{stack.base_url}/completions", json={"model": MODEL})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "missing_api_key"

    def test_invalid_key_is_401(self, stack: Stack) -> None:
        with pytest.raises(openai.AuthenticationError) as raised:
            stack.client(key="tg-not-a-real-key").completions.create(model=MODEL, prompt="x")
        assert raised.value.code == "invalid_api_key"

    def test_malformed_json_is_400(self, stack: Stack) -> None:
        response = httpx.post(
            f"{stack.base_url}/chat/completions",
            content=b'{"model": "sim-model", "messages": [',
            headers={"authorization": f"Bearer {stack.key}"},
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "not valid JSON" in error["message"]

    def test_wrong_field_type_is_400_naming_the_field(self, stack: Stack) -> None:
        with pytest.raises(openai.BadRequestError) as raised:
            stack.client().completions.create(model=MODEL, prompt="x", max_tokens="ten")  # type: ignore[call-overload]
        assert raised.value.param == "max_tokens"

    def test_unknown_model_is_404(self, stack: Stack) -> None:
        with pytest.raises(openai.NotFoundError) as raised:
            stack.client().completions.create(model="no-such-model", prompt="x")
        assert raised.value.code == "model_not_found"

    def test_body_over_the_limit_is_413(self, stack: Stack) -> None:
        response = httpx.post(
            f"{stack.base_url}/completions",
            json={"model": MODEL, "prompt": "x" * 70_000},
            headers={"authorization": f"Bearer {stack.key}"},
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"

    def test_workers_own_400_reaches_the_client_unchanged(self, stack: Stack) -> None:
        body = {"model": MODEL, "prompt": "word " * 10, "max_tokens": 5000}
        direct = httpx.post(f"{stack.sims[0].url}/v1/completions", json=body)
        via = httpx.post(
            f"{stack.base_url}/completions",
            json=body,
            headers={"authorization": f"Bearer {stack.key}"},
        )
        assert via.status_code == direct.status_code == 400
        assert via.content == direct.content
        assert "maximum context length" in via.json()["error"]["message"]
        with pytest.raises(openai.BadRequestError):
            stack.client().completions.create(model=MODEL, prompt="x", max_tokens=5000)

    def test_stream_options_without_stream_is_the_workers_400(self, stack: Stack) -> None:
        with pytest.raises(openai.BadRequestError):
            stack.client().completions.create(
                model=MODEL, prompt="x", stream_options={"include_usage": True}
            )

    def test_unknown_route_and_method(self, stack: Stack) -> None:
        assert httpx.get(f"{stack.base_url}/nope").status_code == 404
        assert httpx.get(f"{stack.base_url}/completions").status_code == 405


def test_every_request_is_metered_with_the_workers_counts(stack: Stack) -> None:
    response = stack.client().completions.create(
        model=MODEL, prompt="meter me", max_tokens=7, extra_headers={"x-request-id": "meter-me"}
    )
    assert response.usage is not None

    def row_of_request() -> list[dict[str, Any]]:
        return [r for r in procs.usage_rows(stack.db) if r["request_id"] == "meter-me"]

    assert procs.wait_for(lambda: len(row_of_request()) == 1)
    row = row_of_request()[0]
    assert row["status"] == "completed"
    assert row["usage_source"] == "worker"
    assert row["key_id"] == stack.key_id
    assert row["worker"] in {s.url for s in stack.sims}
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        response.usage.prompt_tokens,
        response.usage.completion_tokens,
    )


def test_response_names_its_usage_event(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.base_url}/completions",
        json={"model": MODEL, "prompt": "which event am I", "max_tokens": 2},
        headers={"authorization": f"Bearer {stack.key}"},
    )
    assert response.status_code == 200
    event_id = response.headers["x-request-id"]

    def rows() -> list[dict[str, Any]]:
        return [r for r in procs.usage_rows(stack.db) if r["event_id"] == event_id]

    assert procs.wait_for(lambda: len(rows()) == 1)
    assert rows()[0]["request_id"] == event_id


def test_revoked_key_stops_working_within_a_second(make_stack: StackFactory) -> None:
    stack = make_stack(n_sims=1)
    key, key_id = procs.create_key(stack.db, "beta")
    client = stack.client(key=key)
    assert procs.wait_for(lambda: _authorised(client), timeout=2.0)
    procs.cli("keys", "revoke", key_id, "--db", f"sqlite:///{stack.db}")
    revoked_at = time.monotonic()
    assert procs.wait_for(lambda: not _authorised(client), timeout=1.0, interval=0.02)
    assert time.monotonic() - revoked_at < 1.0
    assert _authorised(stack.client())  # other keys are unaffected


def _authorised(client: openai.OpenAI) -> bool:
    try:
        client.models.list()
    except openai.AuthenticationError:
        return False
    return True


def test_metrics_count_what_the_ledger_records(make_stack: StackFactory) -> None:
    stack = make_stack(n_sims=1)
    client = stack.client()
    for _ in range(3):
        client.completions.create(model=MODEL, prompt="x y", max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        stack.client(key="tg-wrong").completions.create(model=MODEL, prompt="x")
    assert procs.wait_for(lambda: len(stack.rows()) == 3)
    metrics = procs.scrape(stack.gateway.url)
    assert metrics["tokengate_requests_total"] == 3
    assert metrics["tokengate_tokens_total"] == sum(
        r["prompt_tokens"] + r["completion_tokens"] + r["cached_tokens"]
        for r in procs.usage_rows(stack.db)
    )
    assert metrics["tokengate_rejected_total"] == 1
    assert metrics["tokengate_worker_healthy"] == 1
    assert metrics["tokengate_usage_events_pending"] == 0

"""`POST /v1/embeddings` through a real `gateway serve` in front of real `gateway sim` workers: the
official `openai` SDK embeds every input shape, the worker's bytes reach the client (vLLM's binary
encoding and its `metadata` header included), each request is one usage event of its prompt
tokens under the endpoint `embeddings`, quotas apply, bad input is a 400, and `/metrics` counts it.

The simulator's tokenizer counts a text as its words plus BOS, token ids as given, and a
conversation as its words plus 4 tokens per message and 3; its vectors have 32 numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support import procs
from tests.support.fleet import Fleet, start_fleet
from tests.support.openai_errors import error
from tests.support.stack import Stack, StackFactory

pytestmark = pytest.mark.e2e

MODEL = "sim-model"
DIM = 32
CHAT = [{"role": "user", "content": "embed this chat"}]

# Each input shape, with the embeddings it makes and their prompt tokens.
SHAPES: dict[str, tuple[Any, int, int]] = {
    "string": ("the quick brown fox", 1, 4 + 1),
    "strings": (["one two", "three", "four five six"], 3, 3 + 2 + 4),
    "token-ids": ([11, 12, 13, 14, 15], 1, 5),
    "token-id-lists": ([[11, 12], [13], [14, 15, 16]], 3, 2 + 1 + 3),
}


def headers(stack: Stack, request_id: str | None = None) -> dict[str, str]:
    extra = {"x-request-id": request_id} if request_id else {}
    return {"authorization": f"Bearer {stack.key}", **extra}


def rows_of(stack: Stack, request_id: str) -> list[dict[str, Any]]:
    return [row for row in procs.usage_rows(stack.db) if row["request_id"] == request_id]


def row_of(stack: Stack, request_id: str) -> dict[str, Any]:
    assert procs.wait_for(lambda: len(rows_of(stack, request_id)) == 1)
    return rows_of(stack, request_id)[0]


@pytest.mark.parametrize("shape", SHAPES)
def test_the_sdk_embeds_every_input_shape_and_each_is_one_event(stack: Stack, shape: str) -> None:
    given, count, tokens = SHAPES[shape]
    request_id = f"embed-{shape}"
    client = stack.client()
    # The SDK asks for base64 unless told otherwise, and decodes it.
    response = client.embeddings.create(
        model=MODEL, input=given, extra_headers={"x-request-id": request_id}
    )
    assert [item.index for item in response.data] == list(range(count))
    assert all(len(item.embedding) == DIM for item in response.data)
    assert (response.usage.prompt_tokens, response.usage.total_tokens) == (tokens, tokens)
    floats = client.embeddings.create(model=MODEL, input=given, encoding_format="float")
    assert [item.embedding for item in floats.data] == [item.embedding for item in response.data]

    row = row_of(stack, request_id)
    assert (row["endpoint"], row["stream"], row["status"]) == ("embeddings", 0, "completed")
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (tokens, 0, 0)
    assert (row["usage_source"], row["http_status"], row["key_id"]) == ("worker", 200, stack.key_id)


def test_dimensions_and_chat_inputs_pass_through(stack: Stack) -> None:
    client = stack.client()
    short = client.embeddings.create(model=MODEL, input="a b", dimensions=8)
    assert len(short.data[0].embedding) == 8
    chat = client.embeddings.create(model=MODEL, input=[], extra_body={"input": CHAT})
    assert chat.usage.prompt_tokens == 3 + 4 + 3
    batch = client.embeddings.create(model=MODEL, input=[], extra_body={"input": [CHAT, CHAT]})
    assert len(batch.data) == 2
    # vLLM ignores `stream` on embeddings: one JSON answer.
    answer = httpx.post(
        f"{stack.base_url}/embeddings",
        json={"model": MODEL, "input": "x", "stream": True},
        headers=headers(stack),
    )
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["usage"]["prompt_tokens"] == 2


@pytest.mark.parametrize("encoding", ["float", "base64", "bytes", "bytes_only"])
def test_relayed_bytes_equal_the_workers(stack: Stack, encoding: str) -> None:
    """Rule one, for every encoding vLLM has; the binary ones carry their shapes and usage in a
    `metadata` header (`bytes`) or nowhere (`bytes_only`), and are metered all the same."""
    body = {"model": MODEL, "input": ["same", "bytes"], "encoding_format": encoding}
    request_id = f"relay-{encoding}"
    direct = httpx.post(
        f"{stack.sims[0].url}/v1/embeddings", json=body, headers=headers(stack, request_id)
    )
    via = httpx.post(f"{stack.base_url}/embeddings", json=body, headers=headers(stack, request_id))
    assert via.status_code == direct.status_code == 200
    assert via.headers["content-type"] == direct.headers["content-type"]
    binary = encoding.startswith("bytes")
    if binary:
        assert via.content == direct.content
        assert len(via.content) == 2 * DIM * 4
    else:
        assert {**via.json(), "created": 0} == {**direct.json(), "created": 0}
        assert via.text.index('"usage"') == direct.text.index('"usage"')
    if encoding == "bytes":
        metadata = json.loads(via.headers["metadata"])
        assert {**metadata, "created": 0} == {
            **json.loads(direct.headers["metadata"]),
            "created": 0,
        }
        assert metadata["usage"]["prompt_tokens"] == 2 + 2
    else:
        assert "metadata" not in via.headers
    row = row_of(stack, request_id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (2 + 2, 0)
    # Without usage anywhere, the gateway counts the inputs with the worker's tokenizer.
    expected_source = "gateway" if encoding == "bytes_only" else "worker"
    assert row["usage_source"] == expected_source


def test_metered_tokens_equal_the_workers_counters(make_stack: StackFactory) -> None:
    """Guarantee 3 for embeddings: the ledger's prompt tokens equal the growth of the workers'
    `vllm:prompt_tokens_total`, and nothing is generated."""
    stack = make_stack(n_sims=2)
    client = stack.client()
    for i in range(12):
        given, _, _ = list(SHAPES.values())[i % len(SHAPES)]
        client.embeddings.create(model=MODEL, input=given)
    assert procs.wait_for(lambda: len(stack.rows()) == 12)
    rows = procs.usage_rows(stack.db)
    assert len({row["worker"] for row in rows}) == 2, "both workers served"
    prompt, generated = stack.sim_totals()
    assert sum(row["prompt_tokens"] for row in rows) == prompt
    assert generated == 0


class TestBadInput:
    @pytest.mark.parametrize(
        ("body", "param"),
        [
            ({"model": MODEL}, "input"),
            ({"input": "x"}, "model"),
            ({"model": MODEL, "input": []}, "input"),
            ({"model": MODEL, "input": [[1, 2], []]}, "input"),
            ({"model": MODEL, "input": [1, "two"]}, "input"),
            ({"model": MODEL, "input": 42}, "input"),
            ({"model": MODEL, "input": {"text": "x"}}, "input"),
            ({"model": MODEL, "input": [None]}, "input"),
            ({"model": 7, "input": "x"}, "model"),
        ],
    )
    def test_the_gateway_refuses_what_no_worker_would_take(
        self, stack: Stack, body: dict[str, Any], param: str
    ) -> None:
        before = len(stack.rows())
        response = httpx.post(f"{stack.base_url}/embeddings", json=body, headers=headers(stack))
        assert error(response, 400)["param"] == param
        assert len(stack.rows()) == before, "a refused request has no usage event"

    def test_body_that_is_not_an_object_is_400(self, stack: Stack) -> None:
        for content in (b"[1, 2]", b'{"model": "sim-model", "input": [', b"\xff"):
            response = httpx.post(
                f"{stack.base_url}/embeddings", content=content, headers=headers(stack)
            )
            error(response, 400)

    def test_token_ids_past_the_body_limit_are_413(self, stack: Stack) -> None:
        ids = list(range(10_000, 22_000))
        response = httpx.post(
            f"{stack.base_url}/embeddings",
            json={"model": MODEL, "input": ids},
            headers=headers(stack),
        )
        assert error(response, 413)["code"] == "request_too_large"

    def test_the_workers_own_400_reaches_the_client_unchanged(self, stack: Stack) -> None:
        body = {"model": MODEL, "input": "x", "dimensions": 4096}
        direct = httpx.post(f"{stack.sims[0].url}/v1/embeddings", json=body)
        via = httpx.post(f"{stack.base_url}/embeddings", json=body, headers=headers(stack))
        assert via.status_code == direct.status_code == 400
        assert via.content == direct.content
        with pytest.raises(openai.BadRequestError):
            stack.client().embeddings.create(model=MODEL, input="x", encoding_format="hex")  # type: ignore[arg-type]

    def test_unknown_model_is_404(self, stack: Stack) -> None:
        with pytest.raises(openai.NotFoundError) as raised:
            stack.client().embeddings.create(model="no-such-model", input="x")
        assert raised.value.code == "model_not_found"


def test_a_client_that_leaves_is_billed_for_its_inputs(make_stack: StackFactory) -> None:
    """vLLM reports an embedding's usage only in its answer: a client gone before it is billed for
    its inputs, counted with the worker's tokenizer (a conversation as vLLM embeds it)."""
    stack = make_stack(n_sims=1, ttft_ms=3000)
    for request_id, given, tokens in (
        ("left-text", ["one two", "three"], 3 + 2),
        ("left-chat", [CHAT, CHAT], 2 * (3 + 4 + 3)),
    ):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                f"{stack.base_url}/embeddings",
                json={"model": MODEL, "input": given},
                headers=headers(stack, request_id),
                timeout=0.3,
            )
        row = row_of(stack, request_id)
        assert (row["status"], row["usage_source"], row["http_status"]) == (
            "cancelled",
            "gateway",
            499,
        )
        assert (row["prompt_tokens"], row["completion_tokens"]) == (tokens, 0)


@pytest.fixture
def budget(tmp_path: Path, fleets: list[Fleet]) -> Fleet:
    """One gateway whose tenant has a daily budget of 600 tokens."""
    fleet = start_fleet(tmp_path, 1, None, {"token_budget": 600, "budget_period": "day"})
    fleets.append(fleet)
    return fleet


def test_quotas_apply_to_embeddings(budget: Fleet) -> None:
    """A budget admits an embeddings request while its prompt's bound (its body's bytes) fits, and
    never spends past it; a model outside the allow-list does not exist for the tenant."""
    url = budget.url(0, "/v1/embeddings")
    body = {"model": MODEL, "input": " ".join(["word"] * 30)}
    served = 0
    with httpx.Client(headers=budget.headers, timeout=30) as client:
        for _ in range(100):
            response = client.post(url, json=body)
            if response.status_code != 200:
                break
            served += 1
        refused = error(response, 429)
        assert refused["code"] == "insufficient_quota"
        assert "would fit" not in refused["message"], "no `max_tokens` to suggest"
        assert "Retry-After" in response.headers
        assert served >= 2
        assert procs.wait_for(lambda: len(procs.usage_rows(budget.db)) == served)
        assert budget.spent() == served * 31 <= 600

        budget.set_quota(models=["another-model"])
        assert procs.wait_for(lambda: client.post(url, json=body).status_code == 404)
        assert error(client.post(url, json=body), 404)["code"] == "model_not_found"


def test_metrics_count_embeddings_under_their_endpoint(make_stack: StackFactory) -> None:
    stack = make_stack(n_sims=1)
    client = stack.client()
    for _ in range(3):
        client.embeddings.create(model=MODEL, input="x y")
    client.completions.create(model=MODEL, prompt="x y", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input=[])
    assert procs.wait_for(lambda: len(stack.rows()) == 4)
    text = httpx.get(f"{stack.gateway.url}/metrics").text

    def sample(series: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(series + " ")]
        assert len(lines) == 1, series
        return float(lines[0].rsplit(" ", 1)[1])

    requests = 'tokengate_requests_total{endpoint="%s",status="completed"}'
    assert sample(requests % "embeddings") == 3
    assert sample(requests % "completions") == 1
    assert sample('tokengate_rejected_total{reason="bad_request"}') == 1
    assert sample('tokengate_tokens_total{kind="prompt"}') == sum(
        row["prompt_tokens"] for row in procs.usage_rows(stack.db)
    )

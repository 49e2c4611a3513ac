"""Usage the gateway counts itself, for requests a worker took but reported no usage for.

The simulator's tokenizer counts a completions prompt as its words plus BOS, a chat prompt as its
words plus 4 tokens per message and 3 per conversation, and generates one word per token; with
`--usage-reporting off` it answers as a server that reports no usage.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support import procs
from tests.support.stack import Stack, StackFactory

pytestmark = pytest.mark.e2e

MODEL = "sim-model"
CHAT = [{"role": "user", "content": "go on and on"}]
CHAT_PROMPT_TOKENS = (4 + 4) + 3


def only_row(stack: Stack) -> dict[str, Any]:
    assert procs.wait_for(lambda: len(stack.rows()) == 1)
    [row] = procs.usage_rows(stack.db)
    return dict(row)


def test_a_stream_left_before_its_first_token_is_billed_for_its_prompt(
    make_stack: StackFactory,
) -> None:
    """vLLM reports usage with its tokens, so a client that leaves during prefill got none: the
    gateway counts the prompt with the worker's tokenizer."""
    stack = make_stack(n_sims=1, ttft_ms=3000)
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 5, "stream": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            f"{stack.base_url}/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {stack.key}"},
            timeout=0.3,
        )
    row = only_row(stack)
    assert (row["status"], row["usage_source"]) == ("cancelled", "gateway")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (CHAT_PROMPT_TOKENS, 0)


def test_a_worker_without_usage_is_counted_as_it_would_have_counted(
    make_stack: StackFactory,
) -> None:
    """Each request twice, to a worker that reports usage and to one that does not: the gateway's
    counts equal the worker's, streaming or not, chat or completions, batches and `n` included."""
    reporting = make_stack(n_sims=1)
    silent = make_stack(n_sims=1, usage_reporting="off")
    requests = [
        ("/completions", {"prompt": "one two three", "max_tokens": 7}),
        ("/completions", {"prompt": ["a b", "c"], "max_tokens": 3, "stream": True}),
        ("/completions", {"prompt": [[5, 6, 7], [8]], "max_tokens": 4}),
        ("/chat/completions", {"messages": CHAT, "max_tokens": 9, "n": 2}),
        ("/chat/completions", {"messages": CHAT, "max_tokens": 40, "stream": True, "n": 2}),
    ]
    for stack in (reporting, silent):
        for path, body in requests:
            response = httpx.post(
                f"{stack.base_url}{path}",
                json={"model": MODEL, "seed": 7, **body},
                headers={"authorization": f"Bearer {stack.key}"},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            if not body.get("stream"):
                # Bodies are relayed as the worker wrote them.
                assert (response.json()["usage"] is None) == (stack is silent)
    counted = ("prompt_tokens", "completion_tokens", "status", "endpoint", "stream")
    assert procs.wait_for(lambda: len(silent.rows()) == len(requests))
    worker = [tuple(r[c] for c in counted) for r in procs.usage_rows(reporting.db)]
    gateway = [tuple(r[c] for c in counted) for r in procs.usage_rows(silent.db)]
    assert sorted(gateway) == sorted(worker)
    assert {r["usage_source"] for r in procs.usage_rows(silent.db)} == {"gateway"}
    # And both equal what the silent worker generated.
    assert sum(r[1] for r in gateway) == silent.sim_totals()[1]


def test_a_stream_without_usage_cut_by_its_client_is_billed_for_what_it_received(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(n_sims=1, usage_reporting="off", itl_ms=30, max_output_tokens=500)
    received = 0
    body = {"model": MODEL, "prompt": "tell me more", "max_tokens": 400, "stream": True}
    headers = {"authorization": f"Bearer {stack.key}"}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{stack.base_url}/completions", json=body, headers=headers) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("data: {"):
                received += 1
                if received == 10:
                    break
    row = only_row(stack)
    assert (row["status"], row["usage_source"]) == ("cancelled", "gateway")
    assert row["prompt_tokens"] == 3 + 1
    # What the gateway relayed: what this client read, and what was in flight towards it.
    assert 10 <= row["completion_tokens"] < 40


def test_a_failed_request_is_not_counted(make_stack: StackFactory) -> None:
    """A worker's 500 is the gateway's and worker's fault, not the client's: no tokens."""
    stack = make_stack(n_sims=1, error_rate=1.0, usage_reporting="off")
    response = httpx.post(
        f"{stack.base_url}/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 3},
        headers={"authorization": f"Bearer {stack.key}"},
        timeout=30,
    )
    assert response.status_code == 500
    row = only_row(stack)
    assert (row["status"], row["usage_source"], row["prompt_tokens"]) == ("failed", "none", 0)

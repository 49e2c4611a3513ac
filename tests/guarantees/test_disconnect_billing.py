"""Guarantee 2: a client that disconnects mid-stream is billed for the prompt and for exactly the
tokens relayed before the disconnect, and the upstream request is cancelled: a raw HTTP stream cut
mid-way (one choice or several), an SDK stream closed early, a non-streaming client that gives up.
Against real gateway and simulator processes. (The same over gRPC: `tests/e2e/test_grpc_api.py`;
behind a worker that reports no usage: `tests/e2e/test_gateway_counting.py`.)"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support import procs
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

MODEL = "sim-model"


@pytest.mark.parametrize("n", [1, 3])
def test_client_disconnect_bills_exactly_what_was_relayed(make_stack: StackFactory, n: int) -> None:
    """Guarantee 2: billed for the prompt and the tokens relayed; the worker stops generating.

    With n > 1 each event carries one choice's token and that choice's own cumulative usage.
    """
    stack = make_stack(n_sims=1, itl_ms=30, max_output_tokens=500)
    body = {
        "model": MODEL,
        "prompt": "tell me a long story",
        "max_tokens": 400,
        "n": n,
        "stream": True,
    }
    received = 0
    with (
        httpx.Client(timeout=30) as http,
        http.stream(
            "POST",
            f"{stack.base_url}/completions",
            json=body,
            headers={"authorization": f"Bearer {stack.key}"},
        ) as response,
    ):
        assert response.status_code == 200
        for payload in procs.sse_events(response.iter_lines()):
            chunk = json.loads(payload)
            assert "usage" not in chunk, "usage the client did not ask for is stripped"
            received += 1
            if received == 10 * n:  # a whole tick: one token of each choice
                break
    assert procs.wait_for(lambda: len(stack.rows()) == 1)
    row = procs.usage_rows(stack.db)[0]
    assert row["status"] == "cancelled"
    assert row["completion_tokens"] == received
    assert row["prompt_tokens"] == 6  # five words and a BOS, as the simulator counts
    # The worker saw the cancel: nothing is running and generation stopped near the cut.
    sim = stack.sims[0]
    assert procs.wait_for(lambda: procs.scrape(sim.url)["vllm:num_requests_running"] == 0)
    generated = int(procs.scrape(sim.url)["vllm:generation_tokens_total"])
    assert received <= generated <= received + 2 * n


def test_sdk_stream_closed_early_is_billed_for_what_it_received(make_stack: StackFactory) -> None:
    """The same cut made the way SDK users make it: `stream.close()` after a few chunks."""
    stack = make_stack(n_sims=1, itl_ms=30, max_output_tokens=500)
    stream = stack.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "go on and on"}],
        max_tokens=300,
        stream=True,
    )
    tokens = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            tokens += 1
            if tokens == 8:
                break
    stream.close()
    assert procs.wait_for(lambda: len(stack.rows()) == 1)
    row = procs.usage_rows(stack.db)[0]
    assert (row["status"], row["completion_tokens"]) == ("cancelled", tokens)
    assert row["prompt_tokens"] == (4 + 4) + 3  # one message of four words, as the sim counts


def test_non_streaming_client_that_gives_up_cancels_the_worker(make_stack: StackFactory) -> None:
    stack = make_stack(n_sims=1, itl_ms=20, max_output_tokens=500)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            f"{stack.base_url}/completions",
            json={"model": MODEL, "prompt": "x", "max_tokens": 200},
            headers={"authorization": f"Bearer {stack.key}"},
            timeout=0.3,
        )
    assert procs.wait_for(lambda: len(stack.rows()) == 1)
    row = procs.usage_rows(stack.db)[0]
    assert (row["status"], row["worker"]) == ("cancelled", stack.sims[0].url)
    # No usage reached the gateway: it counted the prompt (BOS and one word) and billed no
    # completion tokens, since none reached the client. The worker stopped well short of 200.
    assert (row["prompt_tokens"], row["completion_tokens"]) == (2, 0)
    assert row["usage_source"] == "gateway"
    sim = stack.sims[0].url
    assert procs.wait_for(lambda: procs.scrape(sim)["vllm:num_requests_running"] == 0)
    assert procs.scrape(sim)["vllm:generation_tokens_total"] < 50

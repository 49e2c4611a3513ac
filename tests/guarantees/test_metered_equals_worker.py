"""Guarantee 3: for requests that run to their end, metered token counts equal the worker's own
counters (vLLM's `prompt_tokens_total` and `generation_tokens_total`), to the token: a concurrent
mix of completions and chats, streaming or not, `n` > 1, over two real simulators behind a real
gateway."""

from __future__ import annotations

import concurrent.futures

import pytest

from tests.support import procs
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

MODEL = "sim-model"


def test_metered_tokens_equal_the_workers_counters(make_stack: StackFactory) -> None:
    """Guarantee 3: for requests that run to their end, metering equals the workers' counters.

    Completion tokens match one for one. Prompt tokens are billed once per request, as vLLM's
    usage reports them, while vLLM's `prompt_tokens_total` counts a prompt once per sequence
    (`n` times); the simulator counts the same way."""
    stack = make_stack(n_sims=2, itl_ms=1)
    client = stack.client()
    sequences: dict[str, int] = {}

    def one(i: int) -> None:
        prompt = " ".join(["word"] * (1 + i % 7))
        headers = {"x-request-id": f"req-{i}"}
        sequences[f"req-{i}"] = 2 if i % 4 == 1 else 1
        if i % 4 == 0:
            client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=1 + i % 9, extra_headers=headers
            )
        elif i % 4 == 1:
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=i % 11,
                n=2,
                extra_headers=headers,
            )
        elif i % 4 == 2:
            list(
                client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=5, stream=True, extra_headers=headers
                )
            )
        else:
            list(
                client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=1 + i % 13,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_headers=headers,
                )
            )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(80)))
    assert procs.wait_for(lambda: len(stack.rows()) == 80)
    rows = procs.usage_rows(stack.db)
    assert {r["status"] for r in rows} == {"completed"}
    assert {r["worker"] for r in rows} == {s.url for s in stack.sims}, "both workers used"
    prompt, generation = stack.sim_totals()
    assert sum(r["prompt_tokens"] * sequences[r["request_id"]] for r in rows) == prompt
    assert sum(r["completion_tokens"] for r in rows) == generation

"""Guarantee 7: a worker that dies is taken out of rotation; requests that had not started
streaming are retried on another worker, and one that had is ended with an error event and billed
for what it relayed. With no worker left the gateway answers 503, and a worker that comes back
rejoins. Against real gateway and simulator processes."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest

from tests.support import procs
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

MODEL = "sim-model"


def test_worker_killed_in_flight_requests_move_to_the_other(make_stack: StackFactory) -> None:
    """Guarantee 7: a dead worker leaves rotation; requests that had not streamed are retried."""
    stack = make_stack(n_sims=2)
    client = stack.client()
    for sim in stack.sims:
        procs.hold_sim(sim, True)

    def non_streaming(_: int) -> int:
        response = client.completions.create(model=MODEL, prompt="x", max_tokens=3)
        assert response.usage is not None
        return response.usage.completion_tokens

    def streaming(_: int) -> int:
        chunks = list(client.completions.create(model=MODEL, prompt="x", max_tokens=3, stream=True))
        return sum(1 for c in chunks if c.choices and c.choices[0].text)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(non_streaming, i) for i in range(8)]
        futures += [pool.submit(streaming, i) for i in range(8)]
        # Every request is in flight, held before its first token.
        assert procs.wait_for(lambda: stack.outstanding() == 16)
        victim, survivor = stack.sims
        victim.kill()
        procs.hold_sim(survivor, False)
        results = [f.result(timeout=30) for f in futures]
    assert results == [3] * 16
    # The dead worker is out of rotation: everything now lands on the survivor.
    for _ in range(6):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert procs.wait_for(lambda: len(stack.rows()) == 22)
    late = procs.usage_rows(stack.db)[-6:]
    assert {r["worker"] for r in late} == {stack.sims[1].url}


def test_no_healthy_worker_is_503_and_recovers(make_stack: StackFactory) -> None:
    stack = make_stack(n_sims=1)
    client = stack.client()
    client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    stack.sims[0].kill()
    with pytest.raises(openai.InternalServerError) as raised:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert raised.value.status_code == 503
    health = httpx.get(f"{stack.gateway.url}/health")
    assert health.status_code == 503
    # A worker back on the same address rejoins at the next health probe.
    port = stack.sims[0].url.rsplit(":", 1)[1]
    stack.sims[0] = procs.start_sim(port=port)
    assert procs.wait_for(lambda: httpx.get(f"{stack.gateway.url}/health").status_code == 200)
    response = client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert response.usage is not None


def test_worker_failure_mid_stream_ends_with_an_error_event(make_stack: StackFactory) -> None:
    stack = make_stack(n_sims=1, die_rate=1.0, itl_ms=1)
    stream = stack.client().completions.create(model=MODEL, prompt="x", max_tokens=10, stream=True)
    texts: list[str] = []
    with pytest.raises(openai.APIError):
        texts.extend(c.choices[0].text for c in stream if c.choices)
    assert 0 < len(texts) < 10
    assert procs.wait_for(lambda: len(stack.rows()) == 1)
    row = procs.usage_rows(stack.db)[0]
    assert row["status"] == "failed"
    assert row["completion_tokens"] == len(texts)

"""Circuit breaking: a worker whose requests fail past a threshold leaves rotation for a backoff,
then one trial request decides its return. Its failures never reach a client (each is retried on
the other worker before its first byte), metering stays exact, and its ejection and return are in
the gateway's log and `/metrics`. Against real gateway and simulator processes; the failing
worker is a simulator whose failure rate is changed while it runs (`POST /sim/faults`)."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.support import procs
from tests.support.stack import Stack, StackFactory

pytestmark = pytest.mark.e2e

MODEL = "sim-model"
# Long enough that a request loop on a busy machine does not race the backoff's end, short
# enough for the test to wait it out.
BACKOFF_MS = 300


def faults(sim: procs.Process, **rates: float) -> dict[str, float]:
    """Sets the simulator's failure rates (`error_rate`, `die_rate`); with none, reads them. The
    answer holds the failures injected so far (`errors_injected`)."""
    if rates:
        response = httpx.post(f"{sim.url}/sim/faults", json=rates, timeout=5)
    else:
        response = httpx.get(f"{sim.url}/sim/faults", timeout=5)
    response.raise_for_status()
    answer: dict[str, float] = response.json()
    return answer


def worker_sample(stack: Stack, name: str, worker: str) -> float:
    """The gateway's `tokengate_worker_<name>{worker="<worker>"}`, 0 when absent."""
    text = httpx.get(f"{stack.gateway.url}/metrics", timeout=5).text
    series = re.escape(f'tokengate_worker_{name}{{worker="{worker}"}}')
    match = re.search(rf"^{series} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def requests_reached(sim: procs.Process) -> int:
    """Generation requests `sim` took: those it answered and those it failed on purpose."""
    answered = procs.scrape(sim.url).get("vllm:request_success_total", 0.0)
    return int(answered) + int(faults(sim)["errors_injected"])


def complete(stack: Stack, i: int) -> None:
    """One request, streamed every other time; it must get its whole answer."""
    client = stack.client()
    if i % 2:
        chunks = list(client.completions.create(model=MODEL, prompt="x", max_tokens=3, stream=True))
        assert sum(1 for c in chunks if c.choices and c.choices[0].text) == 3
    else:
        response = client.completions.create(model=MODEL, prompt="x", max_tokens=3)
        assert response.usage is not None
        assert response.usage.completion_tokens == 3


def test_a_worker_failing_half_its_requests_is_ejected_and_returns_after_it_recovers(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Trials and returns are logged at info, ejections at warn.
    monkeypatch.setenv("TOKENGATE_LOG", "gateway_core=info")
    stack = make_stack(
        n_sims=2,
        routing=f"breaker_backoff_ms = {BACKOFF_MS}\nbreaker_max_backoff_ms = {BACKOFF_MS}\n",
    )
    failing = stack.sims[0]
    faults(failing, error_rate=0.5)

    # Requests one at a time, until /metrics shows the ejection: at most 20 of them reached the
    # failing worker, and every client got its whole answer.
    sent = 0
    while worker_sample(stack, "ejected", failing.url) == 0:
        assert sent < 100, "the failing worker was never ejected"
        complete(stack, sent)
        sent += 1
    reached = requests_reached(failing)
    print(f"ejected after {reached} requests reached it ({sent} sent through the gateway)")
    assert reached <= 20
    assert worker_sample(stack, "ejections_total", failing.url) == 1
    # Ejected, not down: its health probes still pass, and /health says so.
    assert worker_sample(stack, "healthy", failing.url) == 1
    procs.wait_line(
        stack.gateway, r"worker ejected by its circuit breaker.*(failures in a row|requests failed)"
    )

    # It recovers. No request has been sent since its ejection, so no trial has run: the first
    # trial after this moment finds it well, and it is back after that one trial, at the end of
    # the backoff in force (one probe period; it would be two had a trial been under way as it
    # recovered). Until then only that trial reaches it: the other worker takes every request.
    faults(failing, error_rate=0.0)
    trials = worker_sample(stack, "trial_requests_total", failing.url)
    before = requests_reached(failing)
    recovered = time.monotonic()
    while worker_sample(stack, "returns_total", failing.url) == 0:
        assert time.monotonic() - recovered < 60, "the recovered worker never returned"
        complete(stack, sent)
        sent += 1
        time.sleep(0.02)
    back_after = time.monotonic() - recovered
    print(f"returned {back_after * 1000:.0f} ms after recovering (backoff {BACKOFF_MS} ms)")
    assert worker_sample(stack, "trial_requests_total", failing.url) == trials + 1
    assert requests_reached(failing) == before + 1
    assert worker_sample(stack, "ejected", failing.url) == 0
    procs.wait_line(stack.gateway, r"worker returned to rotation")

    # Back in rotation: it serves again.
    before = requests_reached(failing)
    for i in range(4):
        complete(stack, i)
        sent += 1
    assert requests_reached(failing) > before

    # Metering stayed exact: one completed event per request, and the tokens the ledger holds
    # are the tokens the workers counted (failed attempts generated nothing).
    assert procs.wait_for(lambda: len(stack.rows()) == sent)
    rows = procs.usage_rows(stack.db)
    assert {row["status"] for row in rows} == {"completed"}
    prompt, generation = stack.sim_totals()
    assert sum(row["completion_tokens"] for row in rows) == generation == 3 * sent
    assert sum(row["prompt_tokens"] + row["cached_tokens"] for row in rows) == prompt

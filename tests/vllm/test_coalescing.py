"""Coalescing in front of real vLLM: a gateway with `routing.coalesce_window_us` sends four
clients' completions to one worker as one call, and each client's usage (answer and ledger) is
what vLLM reports for its request alone; the ledger sums to the worker's own counters.

Texts are not compared: vLLM does not promise that a prompt decodes the same in a batch as alone
(its kernels' sums depend on the batch), and on this model a close call can flip. Token counts do
not depend on it: `ignore_eos` and `max_tokens` fix the generated length.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import procs
from tests.vllm.conftest import Fleet
from tests.vllm.cpu_env import SERVED_MODEL

pytestmark = pytest.mark.vllm

PROMPTS = [
    "the gateway meters",
    "every tenant pays for the tokens it uses and",
    "a worker",
    "prefix caching saves the work of a prompt that was seen before, so",
]
SHARED = {"model": SERVED_MODEL, "max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture
def coalescing(fleet: Fleet, tmp_path: Path) -> Iterator[tuple[procs.Process, Path, str]]:
    """A gateway coalescing up to four prompts within a second, in front of the first worker."""
    db = tmp_path / "ledger.db"
    key, _ = procs.create_key(db, "acme")
    config = procs.write_config(
        tmp_path / "gateway.toml",
        [fleet.workers[0].url],
        db,
        routing="coalesce_window_us = 1000000\ncoalesce_max_prompts = 4\n",
    )
    gateway = procs.start(["serve", "--config", str(config)])
    yield gateway, db, key
    gateway.stop()


def post(url: str, key: str, body: dict[str, Any], request_id: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions",
        json=body,
        headers={"authorization": f"Bearer {key}", "x-request-id": request_id},
        timeout=120,
    )


def test_four_clients_in_one_call_each_get_their_own_usage(
    fleet: Fleet, coalescing: tuple[procs.Process, Path, str]
) -> None:
    gateway, db, key = coalescing
    alone = [
        post(fleet.workers[0].url, "unused", {**SHARED, "prompt": p}, f"alone-{i}").json()
        for i, p in enumerate(PROMPTS)
    ]
    before = fleet.settled_counters()

    ids = [f"together-{i}" for i in range(len(PROMPTS))]
    start = threading.Barrier(len(PROMPTS))
    answers: dict[int, httpx.Response] = {}

    def send(i: int) -> None:
        start.wait()
        answers[i] = post(gateway.url, key, {**SHARED, "prompt": PROMPTS[i]}, ids[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    metrics = procs.scrape(gateway.url)
    assert metrics["tokengate_coalesced_calls_total"] == 1
    assert metrics["tokengate_coalesced_requests_total"] == len(PROMPTS)
    for i, want in enumerate(alone):
        got = answers[i].json()
        assert answers[i].status_code == 200, got
        assert got["id"] == f"cmpl-{ids[i]}"
        assert got["usage"] == want["usage"]
        assert [(c["index"], c["finish_reason"]) for c in got["choices"]] == [(0, "length")]
        assert got["choices"][0]["token_ids"] is None
        assert got["choices"][0]["prompt_token_ids"] is None
        assert got["choices"][0]["text"]

    assert procs.wait_for(lambda: len(list(procs.usage_rows(db))) == len(PROMPTS))
    rows = {r["request_id"]: r for r in procs.usage_rows(db)}
    for i, want in enumerate(alone):
        row = rows[ids[i]]
        assert (row["status"], row["usage_source"]) == ("completed", "worker")
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            want["usage"]["prompt_tokens"],
            want["usage"]["completion_tokens"],
        )
    # What the workers counted for the one call is what the ledger holds for the four.
    metered = (
        sum(r["prompt_tokens"] for r in rows.values()),
        sum(r["completion_tokens"] for r in rows.values()),
    )
    after = fleet.settled_counters()
    assert (after[0] - before[0], after[1] - before[1]) == metered

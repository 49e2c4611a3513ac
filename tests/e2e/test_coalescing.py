"""Coalescing (`routing.coalesce_window_us`) through a real `gateway serve` in front of a real
`gateway sim`: compatible non-streaming completions go up as one call, and each client gets
exactly the answer and the usage event it gets when its request goes alone; a call the worker
refuses sends each request on its own, so that only the bad one fails.

The simulator samples each prompt of a request on its own, as vLLM does: a prompt's choices do
not depend on the prompts before it, so the answer alone and the answer coalesced are equal.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from gateway.grpc import GatewayClient, pb
from tests.support import procs
from tests.support.stack import Stack, StackFactory

pytestmark = pytest.mark.e2e

MODEL = "sim-model"
# A batch goes when it holds this many prompts; the window is long enough that every request of
# a test joins before it closes, however slow the machine.
BATCH = 4
ROUTING = f"coalesce_window_us = 1000000\ncoalesce_max_prompts = {BATCH}\n"
MAX_MODEL_LEN = 256


def post(stack: Stack, body: dict[str, Any], request_id: str) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/completions",
        json=body,
        headers={"authorization": f"Bearer {stack.key}", "x-request-id": request_id},
        timeout=30,
    )


def at_once(stack: Stack, bodies: list[dict[str, Any]], ids: list[str]) -> list[httpx.Response]:
    """Posts each body (under its request id) on its own thread, all released together."""
    start = threading.Barrier(len(bodies))
    results: dict[int, httpx.Response] = {}

    def run(i: int) -> None:
        start.wait()
        results[i] = post(stack, bodies[i], ids[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [results[i] for i in range(len(bodies))]


def comparable(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer without what differs between any two calls (its id and its second)."""
    return {k: v for k, v in answer.items() if k not in ("id", "created")}


FIELDS = (
    "status",
    "http_status",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "usage_source",
)


def counts(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[k] for k in FIELDS)


def coalesced(stack: Stack) -> tuple[int, int]:
    metrics = procs.scrape(stack.gateway.url)
    return (
        int(metrics.get("tokengate_coalesced_calls_total", 0)),
        int(metrics.get("tokengate_coalesced_requests_total", 0)),
    )


def rows_by_request(stack: Stack, ids: list[str]) -> dict[str, dict[str, Any]]:
    assert procs.wait_for(lambda: {r["request_id"] for r in procs.usage_rows(stack.db)} >= set(ids))
    return {r["request_id"]: r for r in procs.usage_rows(stack.db) if r["request_id"] in ids}


@pytest.mark.parametrize(
    "prompts",
    [
        ["one", "two words", "three little words", "and now four words"],
        [[11, 12], [13], [14, 15, 16], [17, 18, 19, 20]],
        # Two clients with two prompts each fill a batch of four.
        [["a b", "c"], ["d e f", "g h i j"]],
    ],
    ids=["texts", "token-ids", "prompt-lists"],
)
def test_each_client_gets_what_it_gets_alone(make_stack: StackFactory, prompts: list[Any]) -> None:
    together = make_stack(n_sims=1, routing=ROUTING, itl_ms=1)
    alone = make_stack(n_sims=1, itl_ms=1)
    shared = {"model": MODEL, "max_tokens": 6, "n": 2, "seed": 7, "temperature": 0.8}
    bodies = [{**shared, "prompt": prompt} for prompt in prompts]

    ids = [f"together-{i}" for i in range(len(bodies))]
    answers = at_once(together, bodies, ids)
    assert [a.status_code for a in answers] == [200] * len(bodies)
    assert coalesced(together) == (1, len(bodies))

    alone_ids = [f"alone-{i}" for i in range(len(bodies))]
    expected = [post(alone, b, i) for b, i in zip(bodies, alone_ids, strict=True)]
    assert coalesced(alone) == (0, 0)
    for got, want, request_id in zip(answers, expected, ids, strict=True):
        assert comparable(got.json()) == comparable(want.json())
        assert got.json()["id"] == f"cmpl-{request_id}"
        assert got.headers["content-type"] == want.headers["content-type"]

    rows = rows_by_request(together, ids)
    alone_rows = rows_by_request(alone, alone_ids)
    for request_id, alone_id in zip(ids, alone_ids, strict=True):
        assert counts(rows[request_id]) == counts(alone_rows[alone_id])
    # Exactly what the worker counted: every prompt once, every generated token.
    assert together.sim_totals() == alone.sim_totals()


def test_token_ids_asked_for_are_kept_and_otherwise_null(make_stack: StackFactory) -> None:
    stack = make_stack(n_sims=1, routing=ROUTING, itl_ms=1)
    for asked in (False, True):
        body = {"model": MODEL, "max_tokens": 3, "return_token_ids": asked}
        bodies = [{**body, "prompt": f"p {i}"} for i in range(BATCH)]
        answers = at_once(stack, bodies, [f"{asked}-{i}" for i in range(BATCH)])
        for answer in answers:
            (choice,) = answer.json()["choices"]
            assert (choice["token_ids"] is not None) is asked
            assert (choice["prompt_token_ids"] is not None) is asked
    assert coalesced(stack) == (2, 8)


def test_a_call_the_worker_refuses_sends_each_request_on_its_own(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(n_sims=1, routing=ROUTING, itl_ms=1, max_model_len=MAX_MODEL_LEN)
    body = {"model": MODEL, "max_tokens": 4}
    too_long = " ".join(["word"] * MAX_MODEL_LEN)
    prompts = ["fine", too_long, "also fine", "fine again"]
    ids = [f"mixed-{i}" for i in range(len(prompts))]
    answers = at_once(stack, [{**body, "prompt": p} for p in prompts], ids)
    assert [a.status_code for a in answers] == [200, 400, 200, 200]
    assert answers[1].json()["error"]["type"] == "BadRequestError"
    assert coalesced(stack) == (0, 0)
    rows = rows_by_request(stack, ids)
    assert [(rows[i]["status"], rows[i]["http_status"]) for i in ids] == [
        ("completed", 200),
        ("failed", 400),
        ("completed", 200),
        ("completed", 200),
    ]
    assert [rows[i]["completion_tokens"] for i in ids] == [4, 0, 4, 4]


def test_incompatible_requests_are_not_coalesced(make_stack: StackFactory) -> None:
    stack = make_stack(n_sims=1, routing="coalesce_window_us = 20000\n", itl_ms=1)
    bodies = [
        {"model": MODEL, "prompt": "a", "max_tokens": 2},
        {"model": MODEL, "prompt": "b", "max_tokens": 3},
        {"model": MODEL, "prompt": "c", "max_tokens": 2, "echo": True},
        {"model": MODEL, "prompt": "d", "max_tokens": 2, "stream": True},
    ]
    answers = at_once(stack, bodies, [f"x-{i}" for i in range(len(bodies))])
    assert [a.status_code for a in answers] == [200] * 4
    assert coalesced(stack) == (0, 0)


def test_grpc_completions_are_coalesced_like_http_ones(make_stack: StackFactory) -> None:
    together = make_stack(n_sims=1, routing=ROUTING, config_extra="[grpc]\nport = 0\n", itl_ms=1)
    alone = make_stack(n_sims=1, itl_ms=1)
    target = procs.wait_line(together.gateway, r"gRPC API listening on (\S+)")[1]
    prompts = ["one", "two words", "three little words", "and now four words"]
    answers: dict[int, pb.GenerateResponse] = {}
    start = threading.Barrier(len(prompts))

    def call(i: int) -> None:
        with GatewayClient(target, together.key, timeout=30) as client:
            start.wait()
            answers[i] = client.complete(
                MODEL, prompts[i], max_tokens=5, n=2, seed=3, request_id=f"grpc-{i}"
            )

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert coalesced(together) == (1, len(prompts))

    for i, prompt in enumerate(prompts):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 5, "n": 2, "seed": 3}
        want = post(alone, body, f"http-{i}").json()
        got = answers[i]
        assert got.request_id == f"grpc-{i}"
        assert [(c.index, c.text) for c in got.choices] == [
            (c["index"], c["text"]) for c in want["choices"]
        ]
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
            want["usage"]["prompt_tokens"],
            want["usage"]["completion_tokens"],
        )


@pytest.mark.parametrize(
    ("routing", "expected"),
    [
        # Off by default, on for the model.
        (
            f"coalesce_max_prompts = {BATCH}\n"
            f'[routing.models."{MODEL}"]\ncoalesce_window_us = 1000000\n',
            (1, BATCH),
        ),
        # On by default, off for the model.
        (f'{ROUTING}[routing.models."{MODEL}"]\ncoalesce_window_us = 0\n', (0, 0)),
    ],
    ids=["on-for-the-model", "off-for-the-model"],
)
def test_a_model_s_own_window_overrides_the_default(
    make_stack: StackFactory, routing: str, expected: tuple[int, int]
) -> None:
    stack = make_stack(n_sims=1, routing=routing, itl_ms=1)
    bodies = [{"model": MODEL, "prompt": f"p {i}", "max_tokens": 2} for i in range(BATCH)]
    answers = at_once(stack, bodies, [f"model-{i}" for i in range(BATCH)])
    assert [a.status_code for a in answers] == [200] * BATCH
    assert coalesced(stack) == expected


def test_a_hostile_prompt_fails_alone_and_an_oversized_one_goes_alone(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(n_sims=1, routing=ROUTING, itl_ms=1)
    body = {"model": MODEL, "max_tokens": 2}
    # A token id of 2^62 is no token: the worker refuses the whole call, and each request goes
    # again on its own, so only the hostile one is refused.
    prompts: list[Any] = [[[11, 12]], [[13]], [[2**62]], [[14, 15]]]
    ids = [f"hostile-{i}" for i in range(len(prompts))]
    answers = at_once(stack, [{**body, "prompt": p} for p in prompts], ids)
    assert [a.status_code for a in answers] == [200, 200, 400, 200]
    assert coalesced(stack) == (0, 0)

    # More prompts than a call carries: that request goes on its own, the rest share a call.
    prompts = [["a"], ["b"], ["c"], ["p"] * (BATCH + 1)]
    ids = [f"oversized-{i}" for i in range(len(prompts))]
    answers = at_once(stack, [{**body, "prompt": p} for p in prompts], ids)
    assert [a.status_code for a in answers] == [200] * 4
    assert len(answers[3].json()["choices"]) == BATCH + 1
    assert coalesced(stack) == (1, 3)
    rows = rows_by_request(stack, ids)
    assert [rows[i]["completion_tokens"] for i in ids] == [2, 2, 2, 2 * (BATCH + 1)]

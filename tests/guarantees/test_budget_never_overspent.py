"""Guarantee 4: requests against a budget never spend more than it, whatever one request asks
for (`n`, batches of prompts, no `max_tokens`, over HTTP or gRPC) and however many run at once, in
process and with the counters shared through Redis. A request is admitted only if its worst case
(its prompt's upper bound plus n x prompts x max_tokens, within n x prompts x the context) fits in
what is neither spent nor held. Last, 200 clients spread over three replicas sharing Redis, each
sending until refused, spend no more than the budget."""

from __future__ import annotations

import random
import re
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from gateway.grpc import GatewayClient
from tests.support import procs
from tests.support.fleet import MODEL, Fleet, completion, start_fleet
from tests.support.services.redis import RedisServer

pytestmark = pytest.mark.e2e

BUDGET = 3000
GRPC = "[grpc]\nport = 0\n"
HUGE_N = 2**62


@pytest.fixture(params=["in process", "redis"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path, fleets: list[Fleet]) -> Fleet:
    """Two replicas sharing Redis, or one with its counters in process; the tenant has a daily
    budget of 3000 tokens, and the simulator honours `max_tokens` up to 2000 (its context is
    4096)."""
    redis: RedisServer | None = None
    if request.param == "redis":
        redis = request.getfixturevalue("redis")
    replicas = 2 if redis else 1
    quota = {"token_budget": BUDGET, "budget_period": "day"}
    fleet = start_fleet(tmp_path, replicas, redis, quota, GRPC, itl_ms=1, max_output_tokens=2000)
    fleets.append(fleet)
    return fleet


def grpc_client(fleet: Fleet) -> GatewayClient:
    target = procs.wait_line(fleet.gateways[0], r"gRPC API listening on (\S+)")[1]
    return GatewayClient(target, fleet.key, timeout=30)


def refusal(response: httpx.Response) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status_code, error["code"], error["message"]


def test_no_single_request_spends_past_the_budget(fleet: Fleet) -> None:
    with httpx.Client(headers=fleet.headers, timeout=30) as client, grpc_client(fleet) as rpc:
        # A batch of 64 prompts with n = 64: 4096 sequences of up to 16 tokens each.
        batch = {"model": MODEL, "prompt": ["count"] * 64, "n": 64, "max_tokens": 16}
        status, code, message = refusal(client.post(fleet.url(0), json=batch))
        assert (status, code) == (429, "insufficient_quota"), message
        assert "may use up to" in message, message
        assert f"({BUDGET} tokens)" in message, message

        # gRPC: n = 1024 in one call.
        with pytest.raises(grpc.RpcError) as refused:
            rpc.complete(MODEL, "count", max_tokens=16, n=1024)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # No max_tokens: the context (4096 tokens) is the worst case, past the budget; the
        # answer says which max_tokens would fit, and that one does.
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "tell me a story"}]}
        status, code, message = refusal(
            client.post(fleet.url(1, "/v1/chat/completions"), json=chat)
        )
        assert (status, code) == (429, "insufficient_quota"), message
        fits = re.search(r"`max_tokens` of at most (\d+)", message)
        assert fits is not None, message
        assert (
            client.post(
                fleet.url(1, "/v1/chat/completions"), json=chat | {"max_tokens": int(fits[1])}
            ).status_code
            == 200
        )

        # An n of 2^62 is a worst case no budget holds, never a number that wraps.
        huge = {"model": MODEL, "prompt": "count", "n": HUGE_N, "max_tokens": 16}
        assert refusal(client.post(fleet.url(0), json=huge))[:2] == (429, "insufficient_quota")

    assert procs.wait_for(lambda: len(procs.usage_rows(fleet.db)) == 1)
    assert fleet.spent() <= BUDGET
    prompt, generated = sim_totals(fleet)
    assert generated == procs.usage_rows(fleet.db)[0]["completion_tokens"], (
        "only the request that fitted reached the worker"
    )
    assert prompt > 0


def sim_totals(fleet: Fleet) -> tuple[int, int]:
    metrics = procs.scrape(fleet.sim.url)
    return int(metrics["vllm:prompt_tokens_total"]), int(metrics["vllm:generation_tokens_total"])


def test_an_overflowing_n_neither_wraps_the_holds_nor_frees_them(fleet: Fleet) -> None:
    """Streams of up to 1000 tokens each hold that much of the budget while they run; an n of
    2^62 between them must not wrap the held count (which once let all eight through)."""
    streams: list[Iterator[str]] = []
    refused: Counter[str] = Counter()
    huge = {"model": MODEL, "prompt": "count", "n": HUGE_N, "max_tokens": 1000}
    body = {"model": MODEL, "prompt": "count", "max_tokens": 1000, "stream": True}
    with ExitStack() as open_streams, httpx.Client(headers=fleet.headers, timeout=30) as client:
        for i in range(8):
            response = open_streams.enter_context(client.stream("POST", fleet.url(i), json=body))
            if response.status_code == 200:
                # Running, and holding its worst case. The iterator is kept: dropping it would
                # close the connection, and the gateway would settle the stream as cancelled.
                lines = response.iter_lines()
                next(lines)
                streams.append(lines)
            else:
                response.read()
                refused[response.json()["error"]["code"]] += 1
            after = client.post(fleet.url(i), json=huge)
            refused[after.json()["error"]["code"]] += 1
            assert after.status_code == 429
    # Each stream holds its prompt's bound (under 90 bytes) and 1000 tokens: two fit in 3000.
    assert len(streams) == 2, refused
    assert refused == {"insufficient_quota": 8 + 6}
    assert procs.wait_for(lambda: len(procs.usage_rows(fleet.db)) == 2)
    assert fleet.spent() <= BUDGET


def test_concurrent_requests_of_every_shape_never_overspend(fleet: Fleet) -> None:
    """Thirty clients send requests of random shapes (n, batches, streams, gRPC, no max_tokens)
    until each is refused once."""
    codes: Counter[str] = Counter()
    served = Counter[str]()
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=30)

    def shape(rng: random.Random) -> tuple[str, dict[str, Any]]:
        n = rng.randint(1, 3)
        if rng.random() < 0.5:
            prompts: Any = ["count"] * rng.randint(1, 3)
            body: dict[str, Any] = {"model": MODEL, "prompt": prompts, "n": n}
            path = "/v1/completions"
        else:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": n}
            path = "/v1/chat/completions"
        if rng.random() < 0.8:
            body["max_tokens"] = rng.randint(1, 120)
        body["stream"] = rng.random() < 0.5
        return path, body

    with (
        httpx.Client(headers=fleet.headers, timeout=30, limits=limits) as client,
        grpc_client(fleet) as rpc,
    ):

        def until_refused(seed: int) -> None:
            rng = random.Random(seed)
            for attempt in range(200):
                if rng.random() < 0.2:
                    try:
                        rpc.complete(
                            MODEL, "count", max_tokens=rng.randint(1, 60), n=rng.randint(1, 2)
                        )
                    except grpc.RpcError as error:
                        with lock:
                            codes[f"grpc {error.code().name}"] += 1
                        return
                    with lock:
                        served["grpc"] += 1
                    continue
                path, body = shape(rng)
                response = client.post(fleet.url(seed + attempt, path), json=body)
                if response.status_code != 200:
                    with lock:
                        codes[response.json()["error"]["code"]] += 1
                    return
                response.read()
                with lock:
                    served["http"] += 1

        with ThreadPoolExecutor(30) as pool:
            list(pool.map(until_refused, range(30)))

    assert set(codes) <= {"insufficient_quota", "grpc RESOURCE_EXHAUSTED"}, codes
    assert sum(codes.values()) == 30
    total = served["http"] + served["grpc"]
    assert total > 5, served
    assert procs.wait_for(lambda: len(procs.usage_rows(fleet.db)) == total, timeout=15)
    spent = fleet.spent()
    assert spent <= BUDGET, f"{spent} tokens spent of a budget of {BUDGET}"
    _, generated = sim_totals(fleet)
    rows = procs.usage_rows(fleet.db)
    assert generated == sum(row["completion_tokens"] for row in rows)


def test_a_policy_caps_the_sequences_of_one_request(tmp_path: Path, fleets: list[Fleet]) -> None:
    fleet = start_fleet(tmp_path, 1, None, {"max_sequences": 8}, GRPC, itl_ms=1)
    fleets.append(fleet)
    with httpx.Client(headers=fleet.headers, timeout=30) as client, grpc_client(fleet) as rpc:
        for body in (
            {"model": MODEL, "prompt": "count", "n": 9, "max_tokens": 1},
            {"model": MODEL, "prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1},
            {"model": MODEL, "prompt": "count", "n": HUGE_N, "max_tokens": 1},
        ):
            response = client.post(fleet.url(0), json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert (error["code"], error["param"]) == ("too_many_sequences", "n")
            assert "more than the 8" in error["message"]
        ok = {"model": MODEL, "prompt": ["a", "b"], "n": 4, "max_tokens": 1}
        assert client.post(fleet.url(0), json=ok).status_code == 200
        with pytest.raises(grpc.RpcError) as refused:
            rpc.complete(MODEL, "count", max_tokens=1, n=9)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert procs.wait_for(lambda: len(procs.usage_rows(fleet.db)) == 1)


def test_budget_shared_by_three_replicas_is_never_overspent(
    tmp_path: Path, redis: RedisServer, fleets: list[Fleet]
) -> None:
    """200 clients, each sending until refused, spread over 3 replicas sharing Redis."""
    budget, max_tokens = 3000, 20
    fleet = start_fleet(
        tmp_path, 3, redis, {"token_budget": budget, "budget_period": "day"}, ttft_ms=10, itl_ms=1
    )
    fleets.append(fleet)
    statuses: Counter[int] = Counter()
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    headers = {"authorization": f"Bearer {fleet.key}"}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)

    with httpx.Client(headers=headers, timeout=30, limits=limits) as client:

        def send_until_refused(worker: int) -> None:
            for attempt in range(1000):
                response = client.post(fleet.url(worker + attempt), json=completion(max_tokens))
                with lock:
                    statuses[response.status_code] += 1
                if response.status_code != 200:
                    with lock:
                        codes[response.json()["error"]["code"]] += 1
                    return

        with ThreadPoolExecutor(200) as pool:
            list(pool.map(send_until_refused, range(200)))

    assert set(statuses) == {200, 429}, statuses
    assert codes == {"insufficient_quota": 200}, codes
    assert procs.wait_for(lambda: len(procs.usage_rows(fleet.db)) == statuses[200], timeout=15)
    rows = procs.usage_rows(fleet.db)
    assert {row["status"] for row in rows} == {"completed"}
    spent = sum(row["prompt_tokens"] + row["completion_tokens"] for row in rows)
    assert spent <= budget, f"{spent} spent of a budget of {budget}"
    # The last client refused had nothing else in flight: less than its worst case (its body's
    # length, under 120 bytes here, and its max_tokens) was left of the budget.
    assert spent >= budget - 120 - max_tokens, f"only {spent} of {budget} spent"

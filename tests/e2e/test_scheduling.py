"""The scheduler in a real `gateway serve` in front of a `gateway sim` it keeps full: a tenant's
quota policy sets its requests' class, a gRPC deadline bounds a wait in the queue, and a thousand
clients that leave while queued leave nothing behind."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest

from gateway.grpc import GatewayClient
from gateway.ledger.db import open_ledger
from gateway.ledger.quotas import set_tenant_quota
from gateway.quotas import QuotaPolicy
from tests.support import procs
from tests.support.stack import Stack, StackFactory

pytestmark = pytest.mark.e2e

MODEL = "sim-model"
BODY = {"model": MODEL, "prompt": "x", "max_tokens": 1}
# One worker that takes one of the gateway's requests at a time.
ONE_AT_A_TIME = "max_concurrency = 1"


def sample(url: str, name: str, **labels: str) -> float:
    """The value of one labelled sample in `url`'s `/metrics` (0 when absent)."""
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric == name and wanted <= set(rest.rstrip("}").split(",")):
            return float(value)
    return 0.0


def background(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Runs `call` on a thread; its result lands in the returned list."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    return thread, result


def post(stack: Stack, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/completions",
        json=BODY,
        headers={"authorization": f"Bearer {stack.key}", **(headers or {})},
        timeout=60,
    )


def test_a_tenant_s_policy_sets_its_class_and_a_grpc_deadline_ends_its_wait(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(n_sims=1, config_extra="[grpc]\nport = 0\n", worker=ONE_AT_A_TIME)
    target = procs.wait_line(stack.gateway, r"gRPC API listening on (\S+)")[1]
    with open_ledger(procs.ledger_url(stack.db)) as conn:
        tenant = set_tenant_quota(
            conn, "acme", QuotaPolicy(priority="batch", weight=2, requests_per_minute=100_000)
        )
    # The policy is in force once answers carry its rate limit.
    assert procs.wait_for(
        lambda: post(stack).headers.get("x-ratelimit-limit-requests") == "100000", timeout=15
    )
    procs.hold_sim(stack.sims[0], True)
    busy, _ = background(lambda: post(stack))
    assert procs.wait_for(lambda: stack.outstanding() == 1)
    # It asks for `interactive`; its tenant's ceiling makes it `batch`.
    queued, answer = background(lambda: post(stack, {"x-priority": "interactive"}))
    labels = {"model": MODEL, "tenant": tenant.id}
    assert procs.wait_for(
        lambda: (
            sample(stack.gateway.url, "tokengate_queued_requests", priority="batch", **labels) == 1
        )
    )
    assert sample(stack.gateway.url, "tokengate_queued_requests", priority="interactive") == 0

    # A gRPC call that would wait past its deadline ends RESOURCE_EXHAUSTED, not
    # DEADLINE_EXCEEDED: it was refused for want of a worker, and may be retried later.
    with GatewayClient(target, stack.key) as client, pytest.raises(grpc.RpcError) as caught:
        client.complete(MODEL, "x", max_tokens=1, timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    assert "stayed busy" in (caught.value.details() or "")

    procs.hold_sim(stack.sims[0], False)
    busy.join()
    queued.join()
    assert answer[0].status_code == 200, answer[0].text
    assert procs.wait_for(lambda: stack.outstanding() == 0)
    waited = sample(stack.gateway.url, "tokengate_queue_wait_seconds_count", **labels)
    assert waited == 1


async def _abandon(stack: Stack, clients: int) -> None:
    """Sends `clients` requests at once, waits until every one is queued, then drops them all."""
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        calls = [
            asyncio.create_task(
                http.post(
                    f"{stack.base_url}/completions",
                    json=BODY,
                    headers={"authorization": f"Bearer {stack.key}"},
                )
            )
            for _ in range(clients)
        ]

        def queued() -> float:
            return sample(stack.gateway.url, "tokengate_queued_requests")

        for _ in range(600):
            if await asyncio.to_thread(queued) == clients:
                break
            await asyncio.sleep(0.1)
        assert await asyncio.to_thread(queued) == clients
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


def test_a_thousand_clients_that_leave_while_queued_leave_nothing_behind(
    make_stack: StackFactory,
) -> None:
    clients = 1000
    stack = make_stack(
        n_sims=1,
        worker=ONE_AT_A_TIME,
        routing=f"max_queued = {clients}\nmax_queued_per_tenant = {clients}\n",
        itl_ms=100,
        max_output_tokens=100_000,
    )
    gateway = stack.gateway.url
    with open_ledger(procs.ledger_url(stack.db)) as conn:
        set_tenant_quota(
            conn,
            "acme",
            QuotaPolicy(max_concurrent=5000, token_budget=10**12, requests_per_minute=100_000),
        )
    assert procs.wait_for(
        lambda: post(stack).headers.get("x-ratelimit-limit-requests") == "100000", timeout=15
    )
    # A stream of 4,000 tokens at 10 a second keeps the worker busy for the whole test.
    long_stream = {**BODY, "max_tokens": 4000, "stream": True}
    busy = httpx.Client(timeout=None)
    held_stream = busy.stream(
        "POST",
        f"{stack.base_url}/completions",
        json=long_stream,
        headers={"authorization": f"Bearer {stack.key}"},
    )
    held_stream.__enter__()
    assert procs.wait_for(lambda: stack.outstanding() == 1)
    held = sample(gateway, "tokengate_quota_held_tokens")
    attempts = sample(gateway, "tokengate_upstream_attempts_total")
    assert (sample(gateway, "tokengate_quota_inflight_requests"), held > 0) == (1, True)

    asyncio.run(_abandon(stack, clients))

    assert procs.wait_for(lambda: sample(gateway, "tokengate_queued_requests") == 0)

    def cancelled() -> list[dict[str, Any]]:
        return [r for r in procs.usage_rows(stack.db) if r["status"] == "cancelled"]

    assert procs.wait_for(lambda: len(cancelled()) == clients, timeout=60), len(cancelled())
    # Only the busy stream holds a concurrency slot and tokens against the budget, and no
    # abandoned request reached the worker.
    assert sample(gateway, "tokengate_quota_inflight_requests") == 1
    assert sample(gateway, "tokengate_quota_held_tokens") == held
    assert sample(gateway, "tokengate_upstream_attempts_total") == attempts
    sim = procs.scrape(stack.sims[0].url)
    assert sim["vllm:num_requests_running"] + sim["vllm:num_requests_waiting"] == 1
    abandoned = cancelled()
    assert all(r["worker"] is None for r in abandoned)
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in abandoned) == 0
    held_stream.__exit__(None, None, None)
    busy.close()

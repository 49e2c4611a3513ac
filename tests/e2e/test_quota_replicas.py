"""Quotas against real processes: `gateway serve` replicas in front of `gateway sim`, sharing one
ledger and a real `redis-server`: cancelled streams give back their slots and holds, rate limits
show in headers and as 429s, a lowered quota and a revoked key hold on every replica within a
second, and a budget counted in process survives a restart. (That a budget is never overspent,
by one request or by many across replicas, is guarantee 4's:
`tests/guarantees/test_budget_never_overspent.py`.)"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import httpx
import openai
import pytest

from gateway.ledger.apikeys import revoke_key
from gateway.ledger.db import open_ledger
from gateway.ledger.quotas import set_tenant_quota
from gateway.quotas import QuotaPolicy
from tests.support import procs
from tests.support.fleet import MODEL, Fleet, completion, start_fleet
from tests.support.services.redis import RedisServer


def cancel_streams(fleet: Fleet, count: int, concurrency: int) -> None:
    """Opens `count` streams, `concurrency` at a time, and hangs up on each after its first
    event."""
    headers = {"authorization": f"Bearer {fleet.key}"}
    limits = httpx.Limits(max_connections=concurrency)

    # Closing a stream before its end closes its connection: the gateway sees the hang-up.
    with httpx.Client(headers=headers, timeout=30, limits=limits) as client:

        def one(i: int) -> None:
            body = completion(500, stream=True)
            with client.stream("POST", fleet.url(i), json=body) as response:
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        return

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(count)))


@pytest.mark.parametrize("store", ["in process", "redis"])
def test_a_thousand_cancelled_streams_leave_no_slot_and_no_hold_behind(
    tmp_path: Path, redis: RedisServer, fleets: list[Fleet], store: str
) -> None:
    concurrency = 25
    quota = {
        "max_concurrent": concurrency,
        "token_budget": 10**12,
        "tokens_per_minute": 10**12,
        "requests_per_minute": 10**6,
    }
    fleet = start_fleet(
        tmp_path, 1, redis if store == "redis" else None, quota, itl_ms=5, max_output_tokens=500
    )
    fleets.append(fleet)
    # Fewer clients than slots: a slot comes back when the gateway notices the hang-up (at its
    # next write to that client), which can be just after the client opens its next stream.
    cancel_streams(fleet, 1000, concurrency - 8)

    def released() -> bool:
        if store == "redis":
            state = f"tg:{{{fleet.tenant_id()}}}:t"
            return redis.cli("ZCARD", f"{state}:leases") == "0" and redis.cli(
                "HGET", state, "ht"
            ) in ("0", "")
        metrics = procs.scrape(fleet.gateways[0].url)
        return (
            metrics["tokengate_quota_inflight_requests"] == 0
            and metrics["tokengate_quota_held_tokens"] == 0
        )

    assert procs.wait_for(released, timeout=15), "a slot or a hold was left behind"
    assert procs.wait_for(lambda: len(procs.usage_rows(fleet.db)) == 1000, timeout=15)
    rows = procs.usage_rows(fleet.db)
    assert {row["status"] for row in rows} == {"cancelled"}
    # Every slot is free again: as many streams as the limit run at once.
    cancel_streams(fleet, concurrency, concurrency)


def test_rate_limit_headers_on_both_kinds_of_response_and_the_sdk_sees_429(
    tmp_path: Path, fleets: list[Fleet]
) -> None:
    fleet = start_fleet(
        tmp_path, 1, None, {"requests_per_minute": 3, "tokens_per_minute": 100_000}, itl_ms=1
    )
    fleets.append(fleet)
    with closing(
        openai.OpenAI(base_url=fleet.url(0, "/v1"), api_key=fleet.key, max_retries=0)
    ) as client:
        plain = client.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=3)
        stream = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        )
        for response, remaining in ((plain, "2"), (stream, "1")):
            assert response.headers["x-ratelimit-limit-requests"] == "3"
            assert response.headers["x-ratelimit-remaining-requests"] == remaining
            assert response.headers["x-ratelimit-limit-tokens"] == "100000"
            assert int(response.headers["x-ratelimit-remaining-tokens"]) < 100_000
            assert response.headers["x-ratelimit-reset-requests"].endswith("s")
        assert plain.parse().usage is not None
        assert [chunk for chunk in stream.parse()], "the stream has chunks"
        client.completions.create(model=MODEL, prompt="hi", max_tokens=3)
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=3, stream=True)
    error = refused.value
    assert error.code == "rate_limit_exceeded"
    assert error.type == "rate_limit_exceeded"
    assert 19 <= int(error.response.headers["retry-after"]) <= 20
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"


def first_change(fleet: Fleet, replica: int, changed: int, started: float) -> float:
    """Seconds from `started` until `replica` answers a small completion with `changed`."""
    headers = {"authorization": f"Bearer {fleet.key}"}
    with httpx.Client(headers=headers, timeout=10) as client:
        while time.monotonic() - started < 5:
            if client.post(fleet.url(replica), json=completion(1)).status_code == changed:
                return time.monotonic() - started
            time.sleep(0.01)
    return float("inf")


def test_a_lowered_quota_and_a_revoked_key_hold_on_every_replica_within_a_second(
    tmp_path: Path, redis: RedisServer, fleets: list[Fleet]
) -> None:
    fleet = start_fleet(tmp_path, 3, redis, {"requests_per_minute": 100_000}, itl_ms=0)
    fleets.append(fleet)
    for replica in range(3):
        assert first_change(fleet, replica, 200, time.monotonic()) < 1

    def on_all_replicas(changed: int) -> list[float]:
        started = time.monotonic()
        with ThreadPoolExecutor(3) as pool:
            return list(pool.map(lambda r: first_change(fleet, r, changed, started), range(3)))

    with open_ledger(fleet.db_url) as conn:
        set_tenant_quota(conn, fleet.tenant, QuotaPolicy(token_budget=1))
    lowered = on_all_replicas(429)
    assert max(lowered) <= 1.0, f"a budget of 1 token took {lowered} s to hold"

    with open_ledger(fleet.db_url) as conn:
        set_tenant_quota(conn, fleet.tenant, QuotaPolicy())
        revoke_key(conn, fleet.key_id)
    revoked = on_all_replicas(401)
    assert max(revoked) <= 1.0, f"the revocation took {revoked} s to hold"


def test_an_in_process_budget_survives_a_restart(tmp_path: Path, fleets: list[Fleet]) -> None:
    """Without Redis the counters live in the process; a restarted gateway starts them from what
    the ledger recorded this period."""
    fleet = start_fleet(tmp_path, 1, None, {"token_budget": 400, "budget_period": "day"})
    fleets.append(fleet)
    headers = {"authorization": f"Bearer {fleet.key}"}
    with httpx.Client(headers=headers, timeout=30) as client:
        served = 0
        while client.post(fleet.url(0), json=completion(10)).status_code == 200:
            served += 1
            assert served < 100
        assert served > 3
        assert procs.wait_for(lambda: len(procs.usage_rows(fleet.db)) == served)
        fleet.gateways[0].stop()
        config = tmp_path / "gateway-0.toml"
        fleet.gateways[0] = procs.start(["serve", "--config", str(config)])
        refused = client.post(fleet.url(0), json=completion(10))
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
    spent = sum(r["prompt_tokens"] + r["completion_tokens"] for r in procs.usage_rows(fleet.db))
    assert 400 - 120 <= spent <= 400 + 10

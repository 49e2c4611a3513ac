"""Routing policies against real processes: two `gateway serve` replicas in front of the same two
`gateway sim` workers, with `prefix_affinity` (one as the default policy, the other as the
model's own over a `round_robin` default). Every turn of a conversation lands on one worker,
whichever replica it reaches; conversations spread over both workers; `X-Session-Id` stands for
the prompt; the replicas' `/metrics` count every placement as a hit. Which worker served a
request is read from the ledger's usage events, by request id."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import procs

pytestmark = pytest.mark.e2e

MODEL = "sim-model"
CONVERSATIONS = 16
TURNS = 3


@dataclass
class Replicas:
    gateways: list[procs.Process]
    sims: list[procs.Process]
    db: Path
    key: str

    def post(
        self, replica: int, body: dict[str, object], headers: dict[str, str]
    ) -> httpx.Response:
        url = f"{self.gateways[replica].url}/v1/chat/completions"
        headers = {"authorization": f"Bearer {self.key}", **headers}
        return httpx.post(url, json=body, headers=headers, timeout=30)

    def workers_by_request(self, expected: int) -> dict[str, str]:
        """The worker of each usage event, by request id, once the ledger holds `expected`."""
        assert procs.wait_for(lambda: len(procs.usage_rows(self.db)) >= expected, timeout=30)
        return {row["request_id"]: row["worker"] for row in procs.usage_rows(self.db)}


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Replicas]:
    sims = [procs.start_sim(model=MODEL, ttft_ms=0, itl_ms=0) for _ in range(2)]
    db = tmp_path / "ledger.db"
    key, _ = procs.create_key(db, "acme")
    urls = [sim.url for sim in sims]
    configs = [
        procs.write_config(tmp_path / "a.toml", urls, db, routing='policy = "prefix_affinity"\n'),
        # The other replica lists the workers in the other order: the ring is by URL, not place.
        procs.write_config(
            tmp_path / "b.toml",
            urls[::-1],
            db,
            routing=(
                f'policy = "round_robin"\n[routing.models."{MODEL}"]\npolicy = "prefix_affinity"\n'
            ),
        ),
    ]
    gateways: list[procs.Process] = []
    try:
        for config in configs:
            gateways.append(procs.start(["serve", "--config", str(config)]))
        yield Replicas(gateways=gateways, sims=sims, db=db, key=key)
    finally:
        for process in [*gateways, *sims]:
            process.stop()


def conversation(i: int, turns: int) -> list[dict[str, str]]:
    messages = [
        {"role": "system", "content": f"You are assistant number {i}. " * 20},
        {"role": "user", "content": f"Conversation {i} asks its first question."},
    ]
    for turn in range(1, turns):
        messages.append({"role": "assistant", "content": f"answer {turn} " * 8})
        messages.append({"role": "user", "content": f"follow-up {turn} of conversation {i}"})
    return messages


def affinity(replica: procs.Process, outcome: str) -> float:
    text = httpx.get(f"{replica.url}/metrics", timeout=5).text
    series = f'tokengate_affinity_total{{model="{MODEL}",outcome="{outcome}"}} '
    lines = [line for line in text.splitlines() if line.startswith(series)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_a_conversation_stays_on_one_worker_from_either_replica(replicas: Replicas) -> None:
    sent = 0
    for turn in range(1, TURNS + 1):
        for i in range(CONVERSATIONS):
            body = {"model": MODEL, "messages": conversation(i, turn), "max_tokens": 4}
            # Turns alternate between the replicas, so each conversation meets both.
            response = replicas.post((i + turn) % 2, body, {"x-request-id": f"c{i}-t{turn}"})
            assert response.status_code == 200, response.text
            sent += 1
    workers = replicas.workers_by_request(sent)
    homes = {}
    for i in range(CONVERSATIONS):
        served = {workers[f"c{i}-t{turn}"] for turn in range(1, TURNS + 1)}
        assert len(served) == 1, f"conversation {i} went to {served}"
        homes[i] = served.pop()
    # 16 conversations over two workers: both get some (all on one: 2 in 65,536).
    assert set(homes.values()) == {sim.url for sim in replicas.sims}, homes
    # One request at a time: no worker ever reaches its bound, so every placement is a hit.
    hits = [affinity(gateway, "hit") for gateway in replicas.gateways]
    assert sum(hits) == sent, hits
    assert all(hits), hits
    assert [affinity(gateway, "spill") for gateway in replicas.gateways] == [0.0, 0.0]


def test_a_session_id_stands_for_the_prompt(replicas: Replicas) -> None:
    for i in range(CONVERSATIONS):
        body = {"model": MODEL, "messages": conversation(i, 1), "max_tokens": 2}
        headers = {"x-session-id": "user-7", "x-request-id": f"s{i}"}
        assert replicas.post(i % 2, body, headers).status_code == 200
    workers = replicas.workers_by_request(CONVERSATIONS)
    assert len({workers[f"s{i}"] for i in range(CONVERSATIONS)}) == 1, workers


@pytest.mark.parametrize("session", ["s" * 257, "tab\there", "é"])
def test_a_bad_session_id_is_a_400_naming_it(replicas: Replicas, session: str) -> None:
    body = {"model": MODEL, "messages": conversation(0, 1), "max_tokens": 2}
    url = f"{replicas.gateways[0].url}/v1/chat/completions"
    headers = [
        (b"authorization", f"Bearer {replicas.key}".encode()),
        (b"x-session-id", session.encode()),
    ]
    response = httpx.post(url, json=body, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "x-session-id", error
    assert error["type"] == "invalid_request_error", error


def test_a_hot_prefix_spills_past_its_bound(tmp_path: Path) -> None:
    """With no floor and c = 1, one conversation's concurrent requests cannot all stay home: the
    bound sends some to the other worker, and `/metrics` counts them as spills."""
    sims = [procs.start_sim(model=MODEL, itl_ms=0) for _ in range(2)]
    db = tmp_path / "ledger.db"
    gateway = None
    try:
        key, _ = procs.create_key(db, "acme")
        routing = (
            'policy = "prefix_affinity"\naffinity_load_factor = 1.0\naffinity_load_floor = 0\n'
        )
        config = procs.write_config(tmp_path / "g.toml", [s.url for s in sims], db, routing=routing)
        gateway = procs.start(["serve", "--config", str(config)])
        replicas = Replicas(gateways=[gateway], sims=sims, db=db, key=key)
        body = {"model": MODEL, "messages": conversation(0, 1), "max_tokens": 2}

        def one(i: int) -> int:
            return replicas.post(0, body, {"x-request-id": f"hot-{i}"}).status_code

        # Held before their first token, all six are on the workers at once.
        for sim in sims:
            procs.hold_sim(sim, True)
        with ThreadPoolExecutor(6) as pool:
            answers = [pool.submit(one, i) for i in range(6)]
            outstanding = "tokengate_worker_outstanding_requests"
            assert procs.wait_for(lambda: procs.scrape(gateway.url).get(outstanding) == 6)
            for sim in sims:
                procs.hold_sim(sim, False)
            assert [answer.result(timeout=30) for answer in answers] == [200] * 6
        workers = replicas.workers_by_request(6)
        assert set(workers.values()) == {sim.url for sim in sims}, workers
        assert affinity(gateway, "spill") > 0
        assert affinity(gateway, "hit") + affinity(gateway, "spill") == 6
    finally:
        for process in [*([gateway] if gateway else []), *sims]:
            process.stop()
